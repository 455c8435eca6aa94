"""The embedded job's arms: no_prefix_fix is AXPO with fresh rollouts from the question and the
same extra budget, nothing else changed; the default run and the evidence preset run all three."""

from __future__ import annotations

from collections import Counter

from omegaconf import OmegaConf

from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.records import QuestionGroup
from synthetic_rollouts import make_rollout
from axpo_rllm.demo.main_job import arm_config, job_config


def _flat(cfg) -> dict:
    out = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True))
    return out


def test_no_prefix_fix_differs_from_axpo_only_in_the_prefix_fix():
    axpo, fresh = _flat(arm_config("axpo")), _flat(arm_config("no_prefix_fix"))
    changed = {k for k in axpo.keys() | fresh.keys() if axpo.get(k) != fresh.get(k)}
    assert changed == {"algorithm.axpo.prefix_fix", "job.ablation"}
    assert fresh["algorithm.axpo.prefix_fix"] is False and fresh["algorithm.axpo.enable"] is True


def _group(qid: str, specs) -> QuestionGroup:
    """A question of 8 rollouts: (correct, call-token probabilities or None for no tool call)."""
    return QuestionGroup(qid, tuple(make_rollout(f"{qid}-{i}", qid, correct=c, call_body=p) for i, (c, p) in enumerate(specs)))


def test_no_prefix_fix_buys_the_same_jobs_as_axpo_from_the_question():
    from axpo_rllm.configs.loader import axpo_config

    wrong_tools = [(False, [0.2 + 0.1 * i, 0.5]) for i in range(3)] + [(True, None)] + [(False, None)] * 4
    groups = [_group(f"q{n}", wrong_tools) for n in range(4)]
    plans = {arm: plan_resampling(groups, axpo_config(arm_config(arm))) for arm in ("axpo", "no_prefix_fix")}
    a, f = plans["axpo"], plans["no_prefix_fix"]
    assert a.budget == f.budget and len(a.jobs) == len(f.jobs) > 0
    assert [j.source_id for j in a.jobs] == [j.source_id for j in f.jobs]  # the same selected prefixes' questions
    assert all(j.prefix_len > 0 for j in a.jobs) and all(j.prefix_len == 0 for j in f.jobs)
    assert sum(j.k for j in a.jobs) == sum(j.k for j in f.jobs)  # same extra samples


def test_default_run_has_three_arms_and_the_evidence_preset_more_seeds():
    assert list(job_config().job.arms) == ["axpo", "grpo", "no_prefix_fix"] and job_config().job.seeds == 1
    evidence = job_config(preset="evidence")
    assert list(evidence.job.arms) == ["axpo", "grpo", "no_prefix_fix"] and evidence.job.seeds >= 3


def test_the_held_out_questions_follow_eval_families():
    from axpo_rllm.demo.main_job import eval_tasks_of, world_of

    cfg = job_config()
    tasks = eval_tasks_of(world_of(cfg), cfg)
    counts = Counter(t.metadata["family"] for t in tasks)
    families = list(cfg.eval.families)
    assert sum(counts.values()) == cfg.eval.tasks and set(counts) == set(families)
    assert counts["code"] == cfg.eval.tasks * families.count("code") // len(families)
    assert all(t.task_id.startswith("eval-") for t in tasks)
    everything = job_config(overrides=["eval.families=null", "tasks.world=synthetic", "tasks.asked=null"])
    assert len({t.metadata["family"] for t in eval_tasks_of(world_of(everything), everything)}) == 6

"""The embedded job: config layering, and the whole pipeline end to end (``--smoke``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from axpo_rllm.cli import build_parser
from axpo_rllm.configs.loader import axpo_config, group_size
from axpo_rllm.demo.main_job import job_config
from axpo_rllm.envs.tools.sandbox import ISOLATION_LEVELS, detect_isolation


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``folder``'s TensorBoard event files, read with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_layers_smoke_steps_and_overrides():
    cfg = job_config("rollout_2x", ["rl.lr=1e-3", "algorithm.axpo.k=2"], smoke=True, steps=3)
    assert cfg.rl.steps == 3 and cfg.rl.lr == 1e-3 and cfg.sft.max_steps <= 5
    assert cfg.actor_rollout_ref.rollout.n == 4 and group_size(cfg) == 8  # --smoke halves N, the ablation doubles it
    assert axpo_config(cfg).k == 2 and not axpo_config(cfg).enable
    assert cfg.job.ablation == "rollout_2x" and cfg.job.smoke
    assert cfg.tools.python == {"min_isolation": "rlimits", "private_uid": False}  # any CPU machine
    full = job_config()
    assert full.actor_rollout_ref.rollout.n == 8 and full.algorithm.adv_estimator == "axpo" and full.sft.minutes >= 2
    with pytest.raises(ValueError):
        job_config(None, ["algorithm.axpo.ranking=best"])


def test_rollout_2x_arm_draws_twice_the_jobs_n():
    from axpo_rllm.demo.main_job import arm_config

    for smoke, n in ((False, 6), (True, 6), (False, 3)):
        arm = arm_config("rollout_2x", [f"actor_rollout_ref.rollout.n={n}"], smoke=smoke)
        assert group_size(arm) == 2 * n and group_size(arm_config("grpo", [f"actor_rollout_ref.rollout.n={n}"])) == n


@pytest.mark.parametrize(("overrides", "message"), [
    (["algorithm.axpo.source_tail=keep"], r"algorithm\.axpo\.source_tail=keep cannot be trained by the CPU job"),
    (["algorithm.axpo.r=0.1"], r"algorithm\.axpo\.r / rl\.batch_questions / actor_rollout_ref\.rollout\.n / algorithm\.axpo\.k: "
                               r"AXPO budget E = floor\(r·B·N\) = floor\(0\.1·4·8\) = 3 is below K = 4"),
])
def test_the_cpu_job_refuses_what_it_cannot_train_before_any_stage(overrides, message, tmp_path):
    from argparse import Namespace

    from axpo_rllm.demo.main_job import arm_config, run

    with pytest.raises(ValueError, match=message):
        arm_config("axpo", overrides)
    args = Namespace(arms="axpo", overrides=overrides, smoke=False, steps=None, seeds=None, run_dir=str(tmp_path), resume=None)
    with pytest.raises(ValueError, match=message):
        run(args)
    assert not list(tmp_path.iterdir()), "refused before the run folder (and any stage) exists"


def test_cli_main_flags():
    args = build_parser().parse_args(["main", "--smoke", "--ablation", "grpo", "--steps", "2", "eval.k=4"])
    assert args.smoke and args.ablation == "grpo" and args.steps == 2 and args.overrides == ["eval.k=4"]


def test_arms_and_seeds_flags_and_arm_configs():
    from axpo_rllm.demo.main_job import arm_config, rl_pool

    args = build_parser().parse_args(["main", "--arms", "axpo,grpo,random_rank", "--seeds", "3", "--resume", "runs/x"])
    assert args.arms == "axpo,grpo,random_rank" and args.seeds == 3 and args.resume == "runs/x"
    base = job_config()
    assert list(base.job.arms) == ["axpo", "grpo", "no_prefix_fix"] and base.job.checkpoint_every > 0
    axpo, grpo = arm_config("axpo", smoke=True), arm_config("grpo", smoke=True)
    assert axpo_config(axpo).enable and not axpo_config(grpo).enable
    assert axpo.sft == grpo.sft and axpo.tasks == grpo.tasks and axpo.agent == grpo.agent  # one SFT serves every arm
    with pytest.raises(ValueError):
        arm_config("no_such_arm")
    # the same questions for every arm of one seed; other questions for the next seed; never eval tasks
    p0, p1 = rl_pool(axpo, 0), rl_pool(grpo, 1)
    assert [t.task_id for t in rl_pool(grpo, 0)] == [t.task_id for t in p0]
    assert len(p0) == len(p1) == axpo.rl.steps * axpo.rl.batch_questions
    assert not {t.task_id for t in p0} & {t.task_id for t in p1}
    assert all(t.metadata["split"] == "train" for t in p0 + p1)


@pytest.mark.slow
def test_smoke_runs_both_arms_then_resumes_an_interrupted_arm(tmp_path, monkeypatch, capsys):
    """Tiny model built offline -> tasks -> SFT once -> eval -> AXPO and GRPO arms (2 steps) -> eval ->
    plots + summary + TensorBoard event files, as a user runs it (a fresh process, quiet, lines that
    fit 100 columns); then a run interrupted inside the GRPO arm resumes from its checkpoint."""
    from axpo_rllm.cli import main
    from axpo_rllm.train import trainer as trainer_mod

    monkeypatch.setenv("AXPO_TINY_MODEL_CACHE", str(tmp_path / "models"))  # a fresh machine: build everything
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    # COLUMNS wide: rich would otherwise wrap long lines itself and hide them from the width check.
    proc = subprocess.run([sys.executable, "-m", "axpo_rllm.cli", "main", "--smoke", "--run-dir", "runs"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # About 60-90 s on an idle 2-core machine; the bound leaves room for a loaded CI box.
    assert time.perf_counter() - started < 300
    out = proc.stdout
    assert not [line for line in (out + proc.stderr).splitlines() if len(line) > 100]
    for noise in ("Warning", "WARNING", "Writing model shards", "Loading weights", "it/s]"):
        assert noise not in out + proc.stderr, noise
    (run,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["smoke"] and summary["arms"] == ["axpo", "grpo"] and summary["steps"] == 2
    assert summary["sft"]["heldout_loss_after"] < summary["sft"]["heldout_loss_before"]
    for arm in ("axpo", "grpo"):
        (after,) = summary["eval_after"][arm]
        for key in ("eval/pass@1", "eval/pass@4", "eval/tool_use_rate"):
            assert 0.0 <= summary["eval_before"][key] <= 1.0 and 0.0 <= after[key] <= 1.0
        lines = (run / "arms" / arm / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [0, 1]
        metrics = json.loads(lines[0])
        assert metrics["workflow/failed_rollouts"] == 0 and metrics["actor/loss_tokens"] > 0
        assert "axpo/budget" in metrics and "actor/kl_loss" in metrics
        assert {f"workflow/sandbox_calls/{layer}" for layer in ISOLATION_LEVELS} <= set(metrics)
        assert (run / "arms" / arm / "seed0" / "checkpoint.pt").exists() and (run / "arms" / arm / "config.yaml").exists()
        assert "last_third/all_wrong" in summary["figures"][arm]
        # verl's Tracking wrote TensorBoard event files: the AXPO metrics per step, the eval around them
        scalars = read_scalars(run / "tensorboard" / arm / "seed0")
        for tag in ("axpo/tool_use_rate", "axpo/budget", "axpo/triggered_questions", "actor/kl_loss",
                    "critic/score/mean", "timing_s/step"):
            assert [step for step, _ in scalars[tag]] == [1, 2], tag
        # a rate with nothing to count on a step (no tool subgroup) is left out, not plotted as 0
        expected = [i + 1 for i, x in enumerate(lines) if json.loads(x)["axpo/all_wrong_rate"] is not None]
        assert [step for step, _ in scalars.get("axpo/all_wrong_rate", [])] == expected
        assert scalars["axpo/budget"][0][1] == metrics["axpo/budget"]
        assert [step for step, _ in scalars["val-core/synthetic/pass@1"]] == [0, 2]
        assert scalars["val-core/synthetic/pass@1"][1][1] == pytest.approx(after["eval/pass@1"])
    assert summary["eval_before"]["eval/failed_rollouts"] == 0
    assert (run / "plots" / "curves.png").stat().st_size > 0 and (run / "plots" / "eval.png").stat().st_size > 0
    assert "Pass@1" in (run / "summary.md").read_text()
    assert re.search(r"^ +[\d.]+s axpo +0 +1/2 ", out, re.M) and re.search(r"^ +[\d.]+s grpo +0 +2/2 ", out, re.M)
    assert "summary.md" in out and "Pass@4" in out
    # The python tool's layer, said once (the CPU job's floor allows any layer; training's does not).
    assert out.count("python tool sandbox:") == 1
    assert f"python tool sandbox: {detect_isolation('auto', 'fork').describe()}" in out

    # Interrupt the GRPO arm at its second step: the checkpoint after step 1 survives.
    real_step = trainer_mod.AXPOTrainer.step

    def failing(self, tasks, step):
        if step == 1 and not self.workflow.config.axpo.enable:
            raise KeyboardInterrupt("simulated interruption")
        return real_step(self, tasks, step)

    monkeypatch.setattr(trainer_mod.AXPOTrainer, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        main(["main", "--smoke", "--run-dir", str(tmp_path / "again")])
    (again,) = list((tmp_path / "again").iterdir())
    assert not (again / "arms" / "grpo" / "seed0" / "result.json").exists()
    monkeypatch.setattr(trainer_mod.AXPOTrainer, "step", real_step)
    capsys.readouterr()
    assert main(["main", "--resume", str(again)]) == 0
    out = capsys.readouterr().out
    assert "SFT: resumed" in out and "axpo seed 0: finished earlier" in out and "resumed from" in out
    lines = (again / "arms" / "grpo" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]
    # the resumed run samples what the uninterrupted one did (seeds derive from step and question)
    first = [json.loads(x) for x in (run / "arms" / "grpo" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in lines]
    assert [m["train/reward_mean"] for m in resumed] == [m["train/reward_mean"] for m in first]

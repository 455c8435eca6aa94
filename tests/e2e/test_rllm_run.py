"""One rllm training run, end to end, on CPU: ``axpo-rllm train`` with rllm's ``AgentTrainer``
(backend verl), verl's FSDP2 actor and a vLLM-CPU rollout server under Ray, on the tiny Qwen-VL.

rollouts through verl's vLLM server -> AXPO's plan and continuations -> rllm's advantages -> verl's
actor update -> weight sync to the server -> checkpoint -> validation -> the next step.

Runs (module fixtures, each a subprocess under a hard timeout: a broken weight sync hangs):

- ``axpo``: the shipped AXPO config (tool resampling, N=8, K=4, r=0.25) for 3 steps of B=2, one
  sequence per micro-batch (verl #7899's case) and one text-only question (the all-text case);
- ``resumed``: the same arguments, killed once step 2's checkpoint is on disk (as a preempted job
  is), then started again with the same arguments: it must go on at step 3;
- ``grpo``: ``--ablation grpo``, one step through the same path.

Versions: the test prints the installed rllm / verl / vLLM / torch / transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness import Run, run_args, run_e2e

pytestmark = pytest.mark.e2e

STEPS = 3
QUESTIONS = 2
RUN_TIMEOUT_S = 1500.0


def _args(prepared, run_dir: Path, search_url: str, steps: int, experiment: str) -> list[str]:
    return run_args(prepared, run_dir, search_url, steps, experiment, questions=QUESTIONS)


def _run(args, run_dir: Path, tag: str = "", stop_when=None) -> Run:
    return run_e2e(args, run_dir, RUN_TIMEOUT_S, tag, stop_when)


@pytest.fixture(scope="module")
def axpo(prepared, search_url, tmp_path_factory) -> Run:
    run_dir = tmp_path_factory.mktemp("axpo")
    run = _run(_args(prepared, run_dir, search_url, STEPS, "axpo"), run_dir)
    run.check_ok()
    return run


@pytest.fixture(scope="module")
def resumed(prepared, search_url, tmp_path_factory, axpo) -> tuple[Run, Run]:
    run_dir = tmp_path_factory.mktemp("resumed")
    args = _args(prepared, run_dir, search_url, STEPS, "resumed")
    marker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    first = _run(args, run_dir, "-1", stop_when=lambda: marker.exists() and marker.read_text().strip() == "2")
    assert not first.result.timed_out and marker.read_text().strip() == "2", first.result.tail()
    second = _run(args, run_dir, "-2")
    second.check_ok()
    return first, second


@pytest.fixture(scope="module")
def grpo(prepared, search_url, tmp_path_factory, resumed) -> Run:
    run_dir = tmp_path_factory.mktemp("grpo")
    run = _run(["--ablation", "grpo", *_args(prepared, run_dir, search_url, 1, "grpo")], run_dir)
    run.check_ok()
    return run


def _triggered_step(run: Run) -> int:
    steps = [s for s, m in run.metrics.items() if m.get("batch/workflow/rollouts_phase3", 0) > 0]
    assert steps, {s: m.get("batch/workflow/rollouts_phase3") for s, m in run.metrics.items()}
    return steps[0]


def test_axpo_runs_every_step_and_resamples_with_the_default_tool_target(axpo, prepared):
    assert sorted(s for s in axpo.metrics if "actor/pg_loss" in axpo.metrics[s]) == list(range(1, STEPS + 1))
    step = _triggered_step(axpo)
    dump = axpo.dump(step)
    roles = {t["role"] for g in dump["groups"] for t in g["trajectories"]}
    assert "continuation" in roles, roles
    assert prepared["impossible"] in dump["questions"], "only the unanswerable question can trigger here"


def test_the_verl_batch_carries_axpo_advantages(axpo):
    """Every row of the verl batch the actor trains on carries, on all its loss tokens, the advantage
    AXPO's grouping hook computed with the core for its trajectory (continuation groups included)."""
    nonzero = 0
    for step in range(1, STEPS + 1):
        dump = axpo.dump(step)
        core = {t["uid"]: t["advantage"] for g in dump["groups"] for t in g["trajectories"] if t["steps"]}
        rows = dump["rows"]  # rllm names rows by its own trajectory ids: compared as multisets
        assert len(rows) == len(core), (len(rows), len(core))
        assert all(r["spread"] < 1e-6 for r in rows), "one advantage per row, broadcast over its tokens"
        got = sorted(r["first"] for r in rows)
        assert got == pytest.approx(sorted(core.values()), abs=1e-5)
        nonzero += sum(abs(a) > 1e-6 for a in got)
    assert nonzero, "every advantage of every step is zero: the run trained on nothing"


def _actor_weights(run: Run, step: int) -> dict:
    import torch

    path = run.run_dir / "checkpoints" / f"global_step_{step}" / "actor" / "model_world_size_1_rank_0.pt"
    state = torch.load(path, weights_only=False, map_location="cpu")
    return {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()}


def test_the_actor_update_is_real_and_the_weights_reach_the_rollout_server(axpo):
    for step in range(1, STEPS + 1):
        assert math.isfinite(axpo.metrics[step]["actor/pg_loss"]) and math.isfinite(axpo.metrics[step]["grad_norm"])
    moved = [s for s in range(2, STEPS + 1) if axpo.metrics[s]["grad_norm"] > 0]
    assert moved, {s: axpo.metrics[s]["grad_norm"] for s in axpo.metrics}
    before, after = _actor_weights(axpo, moved[-1] - 1), _actor_weights(axpo, moved[-1])
    assert max(float((before[k] - after[k]).abs().max()) for k in after) > 0, "the update changed no weight"
    # the rollouts of the step after an update were sampled with its weights: after the sync the
    # server and the actor agree to float32 precision (a sync that did not land: the whole update)
    synced = [s + 1 for s in range(1, STEPS) if axpo.metrics[s]["grad_norm"] > 0]
    assert synced, "no step followed an update"
    for step in synced:
        assert axpo.metrics[step]["training/rollout_probs_diff_max"] < 1e-3, step
        assert axpo.metrics[step]["training/rollout_logprob_gap_mean"] < 2e-4, step


def test_checkpoints_validation_and_diagnostics(axpo):
    ckpt = axpo.run_dir / "checkpoints"
    for step in range(1, STEPS + 1):
        assert (ckpt / f"global_step_{step}" / "actor").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    tags = set().union(*axpo.metrics.values())
    assert any(t.startswith("val/") for t in tags), sorted(tags)[:40]
    for name in ("batch/axpo/triggered_questions", "batch/axpo/recovery_rate", "batch/axpo/all_wrong_rate",
                 "batch/axpo/failed_share", "batch/axpo/failed_rollouts"):
        assert name in tags, sorted(t for t in tags if "axpo" in t)


def test_a_killed_run_resumes_where_an_uninterrupted_run_would_be(resumed, axpo):
    first, second = resumed
    assert max(first.metrics) == 2
    assert sorted(second.metrics) == [3], "the second invocation goes on at step 3"
    want, got = axpo.dump(3), second.run_dir.joinpath("dump", "step_3.json")
    got = json.loads(got.read_text())
    assert got["questions"] == want["questions"], "the dataloader goes on where it stopped"
    # the coordinator counts steps from 0: global step 3 draws AXPO's seeds of its step 2
    assert got["axpo_seed_step"] == want["axpo_seed_step"] == [2], "AXPO's seeds follow the step counter"
    # the batch the actor trains on at step 3: the same rows, token for token, with the same
    # advantages (the checkpoint's weights in the server, seeded sampling, the same plan)
    batch = lambda dump: sorted((r["digest"], round(r["first"], 5)) for r in dump["rows"])  # noqa: E731
    assert batch(got) == batch(want), "the resumed run's step-3 batch differs from the uninterrupted run's"


def test_the_grpo_ablation_runs_through_the_same_path(grpo):
    m = grpo.metrics[1]
    assert m.get("batch/workflow/rollouts_phase3", 0) == 0
    assert math.isfinite(m["actor/pg_loss"]) and "grad_norm" in m
    dump = grpo.dump(1)
    assert {t["role"] for g in dump["groups"] for t in g["trajectories"]} <= {"ordinary"}

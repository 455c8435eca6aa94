"""The embedded job's report: per-step lines, window figures over seeds, the note, the PNGs."""

from __future__ import annotations

import math

import pytest

from axpo_rllm.demo.report import (
    LINE_WIDTH,
    closing_note,
    compact_table,
    measured_figures,
    plot_curves,
    plot_eval,
    step_header,
    step_line,
    window_mean,
)

STAMP = len(f"{99999.9:7.1f}s ")
"""The job's time stamp before every logged line (main_job.run's log)."""


def _history(tool_use, all_wrong, recovery=None):
    return [{"step": float(i), "axpo/tool_use_rate": t, "axpo/all_wrong_rate": a, "train/reward_mean": 0.5,
             "axpo/recovery_rate": (recovery[i] if recovery else None), "axpo/triggered_questions": 1.0,
             "axpo/budget": 8.0, "axpo/extra_samples_used": 4.0, "axpo/budget_used_fraction": 0.5,
             "actor/kl_loss": 1e-3, "timing/step_s": 2.0} for i, (t, a) in enumerate(zip(tool_use, all_wrong))]


def _columns(line: str) -> list[str]:
    return line.split()


def test_step_line_names_arm_seed_step_reward_tool_use_all_wrong_recovery_budget_and_seconds():
    header, line = step_header(), step_line(_history([0.3], [0.5], [None])[0], "axpo", 1, 12)
    assert _columns(header) == ["arm", "seed", "step", "reward", "tool", "all-wrong", "trig", "recov",
                                "budget", "kl", "secs"]
    assert _columns(line) == ["axpo", "1", "1/12", "0.50", "0.30", "0.50", "1", "—", "4/8", "1.0e-03", "2.0"]
    # each value ends where its title ends (right-aligned under it)
    for title, value in (("reward", "0.50"), ("budget", "4/8"), ("secs", "2.0")):
        assert header.index(title) + len(title) == line.index(" " + value) + 1 + len(value)


def test_step_lines_fit_100_columns_with_the_widest_values():
    wide = {"step": 998.0, "train/reward_mean": -1.0, "axpo/tool_use_rate": 1.0, "axpo/all_wrong_rate": 1.0,
            "axpo/triggered_questions": 128.0, "axpo/recovery_rate": 1.0, "axpo/extra_samples_used": 1024.0,
            "axpo/budget": 1024.0, "actor/kl_loss": -1.5e-3, "timing/step_s": 9999.9}
    for arm in ("axpo", "no_tool_resampling", "an_arm_name_longer_than_its_column"):
        for line in (step_header(), step_line(wide, arm, 9, 999)):
            assert STAMP + len(line) <= LINE_WIDTH, (len(line), line)
    assert step_line(wide, "an_arm_name_longer_than_its_column", 0, 999).startswith("an_arm_name_longe…")


def test_compact_table_fits_100_columns_and_keeps_the_means():
    hs = {arm: [_history([0.3] * 6, [0.6] * 6, [0.25] * 6)] for arm in ("axpo", "no_tool_resampling")}
    evals = {arm: [{"eval/pass@1": 0.5, "eval/pass@4": 0.7, "eval/tool_use_rate": 0.3,
                    "eval/code/pass@1": 0.2, "eval/code/questions": 3.0,
                    "eval/crop/pass@1": 0.6, "eval/crop/questions": 1.0}] for arm in hs}
    lines = compact_table(measured_figures(hs, evals, 4), {"eval/pass@1": 0.45, "eval/pass@4": 0.6}, 4)
    assert all(len(line) <= LINE_WIDTH for line in lines), [len(x) for x in lines]
    # tool P@1: the tool families' Pass@1 weighted by their questions, (3 * 0.2 + 0.6) / 4
    assert _columns(lines[1]) == ["axpo", "1", "0.300", "→", "0.300", "0.600", "→", "0.600", "0.250", "0.300",
                                  "0.500", "0.700"]
    assert _columns(lines[-1])[-3:] == ["—", "0.450", "0.600"] and lines[-1].startswith("SFT (before RL)")


def test_windows_are_thirds_per_seed_then_mean_and_spread_over_seeds():
    h0 = _history([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1, 1, 1, 0, 0, 0])
    h1 = _history([0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [1, 1, 1, 1, 1, 1])
    mu, sd, n = window_mean([h0, h1], "axpo/tool_use_rate", "first")
    assert n == 2 and mu == pytest.approx((0.15 + 0.35) / 2) and sd == pytest.approx(0.1)
    assert window_mean([h0, h1], "axpo/all_wrong_rate", "last")[0] == pytest.approx(0.5)
    assert math.isnan(window_mean([h0], "axpo/recovery_rate")[0])  # no value anywhere: NaN, not 0


def test_figures_note_and_plots(tmp_path):
    hs = {"axpo": [_history([0.3] * 6, [0.4] * 6, [0.5, None, 1.0, 0.0, None, 0.5])],
          "grpo": [_history([0.3] * 6, [0.6] * 6)]}
    evals = {"axpo": [{"eval/pass@1": 0.5, "eval/pass@4": 0.7, "eval/tool_use_rate": 0.3}],
             "grpo": [{"eval/pass@1": 0.49, "eval/pass@4": 0.69, "eval/tool_use_rate": 0.3}]}
    figs = measured_figures(hs, evals, 4)
    assert figs["axpo"]["recovery_rate"][0] == pytest.approx(0.5) and math.isnan(figs["grpo"]["recovery_rate"][0])
    assert figs["grpo"]["first_third/all_wrong"][0] == pytest.approx(0.6)
    before = {"eval/pass@1": 0.45, "eval/pass@4": 0.6, "eval/tool_use_rate": 0.3}
    note = closing_note(figs, before, 4)
    assert "| axpo | 1 |" in note and "AXPO − grpo:" in note and "last-third all-wrong -0.200 (one seed: no spread)" in note
    pytest.importorskip("matplotlib")
    assert plot_curves(hs, tmp_path / "c.png").stat().st_size > 1000
    assert plot_eval(before, evals, 4, tmp_path / "e.png").stat().st_size > 1000


def test_gaps_are_read_against_twice_their_seed_standard_error():
    """With 3 seeds the spread is the standard error of the mean (sample std / sqrt(n)); the arms
    share seeds and questions, so a gap is read seed by seed: it counts only beyond twice the
    standard error of the per-seed differences."""
    evals_a = [{"eval/pass@1": v, "eval/pass@4": v, "eval/tool_use_rate": 0.5, "eval/crop/pass@1": v,
                "eval/crop/questions": 8.0} for v in (0.60, 0.62, 0.64)]
    evals_g = [{**e, "eval/crop/pass@1": e["eval/crop/pass@1"] - d} for e, d in zip(evals_a, (0.01, 0.02, 0.03))]
    hs = {arm: [_history([0.3] * 3, [0.5] * 3)] * 3 for arm in ("axpo", "grpo")}
    figs = measured_figures(hs, {"axpo": evals_a, "grpo": evals_g}, 4)
    mu, se = figs["axpo"]["after/eval/tool/pass@1"]
    assert mu == pytest.approx(0.62) and se == pytest.approx(0.02 / math.sqrt(3))
    lines = closing_note(figs, {"eval/pass@1": 0.5, "eval/pass@4": 0.6}, 4)
    # per-seed gaps 0.01, 0.02, 0.03: mean 0.02, SE 0.01 / sqrt(3) = 0.0058 -> beyond 2 SE, although
    # the two means' own errors combined (0.0129) would call it noise
    assert "tool-family Pass@1 +0.020 (> 2 SE (0.012))" in lines
    noisy = [{**e, "eval/crop/pass@1": e["eval/crop/pass@1"] - d} for e, d in zip(evals_a, (0.05, -0.02, 0.03))]
    figs = measured_figures(hs, {"axpo": evals_a, "grpo": noisy}, 4)
    # per-seed gaps 0.05, -0.02, 0.03: mean 0.02, sample std 0.036, SE 0.0208
    assert "tool-family Pass@1 +0.020 (within 2 SE (0.042))" in closing_note(figs, {}, 4)
    far = measured_figures(hs, {"axpo": evals_a, "grpo": [{**e, "eval/crop/pass@1": 0.3} for e in evals_g]}, 4)
    assert "tool-family Pass@1 +0.320 (> 2 SE (0.023))" in closing_note(far, {}, 4)


def test_a_gap_between_arms_of_different_seed_counts_combines_their_errors():
    evals = lambda vals: [{"eval/pass@1": v, "eval/crop/pass@1": v, "eval/crop/questions": 8.0} for v in vals]  # noqa: E731
    hs = {"axpo": [_history([0.3] * 3, [0.5] * 3)] * 3, "grpo": [_history([0.3] * 3, [0.5] * 3)] * 2}
    figs = measured_figures(hs, {"axpo": evals((0.60, 0.62, 0.64)), "grpo": evals((0.50, 0.52))}, 4)
    # unpaired: sqrt(0.01155^2 + 0.01^2) = 0.0153
    assert "tool-family Pass@1 +0.110 (> 2 SE (0.031))" in closing_note(figs, {}, 4)


def test_an_arm_keeps_its_colour_on_panels_where_another_arm_has_nothing(tmp_path):
    """GRPO has no recovery rate: no_prefix_fix must not take GRPO's colour on that panel."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    hs = {"axpo": [_history([0.3] * 3, [0.4] * 3, [0.5] * 3)], "grpo": [_history([0.3] * 3, [0.6] * 3)],
          "no_prefix_fix": [_history([0.2] * 3, [0.5] * 3, [0.25] * 3)]}
    seen = []
    original = plt.Axes.plot

    def spy(ax, *args, **kwargs):
        lines = original(ax, *args, **kwargs)
        seen.append((ax.get_title() or len(seen), kwargs.get("label", "").split(" ")[0], lines[0].get_color()))
        return lines

    plt.Axes.plot = spy
    try:
        plot_curves(hs, tmp_path / "c.png")
    finally:
        plt.Axes.plot = original
    colors = {}
    for _, arm, color in seen:
        colors.setdefault(arm, set()).add(color)
    assert all(len(c) == 1 for c in colors.values()), colors
    assert len({next(iter(c)) for c in colors.values()}) == 3

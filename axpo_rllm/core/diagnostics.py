"""docs/algorithm.md §7: the diagnostics logged every step, computed from the step's records alone."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.failures import failed, failure_counts
from axpo_rllm.core.planner import check_continuations, is_triggered
from axpo_rllm.core.records import QuestionGroup, ResamplePlan, Rollout, Termination

__all__ = ["step_diagnostics"]


def _mean(values: Sequence[float]) -> float:
    """Mean, or NaN for an empty set (a missing quantity must not read as 0)."""
    return float(np.mean(values)) if len(values) else float("nan")


def step_diagnostics(
    groups: Sequence[QuestionGroup],
    plan: ResamplePlan,
    continuations: Sequence[Rollout],
    config: AXPOConfig,
) -> dict[str, float]:
    """Every §7 quantity, keyed ``axpo/<name>`` (verl/rllm metric style), plus the failures.

    Rates and accuracies are over the rollouts that did not fail (core.failures); the recovery
    rate is over the prefixes with at least one continuation that did not fail.
    """
    everyone = [r for g in groups for r in g.rollouts] + list(continuations)
    originals = [r for g in groups for r in g.rollouts if not failed(r)]
    tool = [r for r in originals if r.used_tool]
    no_tool = [r for r in originals if not r.used_tool]
    with_tool_subgroup = [g for g in groups if g.tool_subgroup]
    all_wrong = [g for g in with_tool_subgroup if is_triggered(g, "tool")]
    by_job = check_continuations(plan, continuations) if plan.jobs else {}
    live = {j.source_id: [c for c in by_job[j.source_id] if not failed(c)] for j in plan.jobs}
    recovered = [any(c.correct for c in conts) for conts in live.values() if conts]
    selected_ids = {j.source_id for j in plan.jobs}
    failures = failure_counts(everyone)
    return {
        "axpo/tool_use_rate": _mean([r.used_tool for r in originals]),
        "axpo/all_wrong_rate": len(all_wrong) / len(with_tool_subgroup) if with_tool_subgroup else float("nan"),
        "axpo/all_wrong_share_of_questions": len(all_wrong) / len(groups) if groups else float("nan"),
        "axpo/triggered_questions": float(len(plan.triggered)),
        "axpo/candidate_prefixes": float(len(plan.candidates)),
        "axpo/prefixes_selected": float(len(plan.jobs)),
        "axpo/budget": float(plan.budget),
        "axpo/extra_samples_used": float(plan.used),
        "axpo/budget_used_fraction": plan.used / plan.budget if plan.budget else float("nan"),
        "axpo/recovery_rate": _mean(recovered),
        "axpo/c_selected_mean": _mean([c.confidence for c in plan.candidates if c.source_id in selected_ids]),
        "axpo/c_unselected_mean": _mean([c.confidence for c in plan.candidates if c.source_id not in selected_ids]),
        "axpo/acc_tool": _mean([r.correct for r in tool]),
        "axpo/acc_no_tool": _mean([r.correct for r in no_tool]),
        "axpo/acc_continuations": _mean([r.correct for r in continuations if not failed(r)]),
        "axpo/failed_rollouts": float(sum(failures.values())),
        "axpo/failed_share": sum(failures.values()) / len(everyone) if everyone else float("nan"),
        **{f"axpo/failed/{reason}": float(n) for reason, n in sorted(failures.items())},
        "axpo/over_turn_rollouts": float(sum(r.termination is Termination.OVER_TURN for r in everyone)),
        "axpo/enabled": float(config.enable),
    }

"""The order of an AXPO step's phases, written once.

    phase 1  rollouts      N per question                              (the caller: agent + engine)
    phase 2  plan          §1–§4 -> ResamplePlan                       :func:`plan_resampling`
    phase 3  resample      K token-exact continuations per prefix      (the caller)
    phase 4  advantages    §6 rows + §7 diagnostics                    :func:`finish_step`

:func:`axpo_step` runs the four in order for synchronous callers (the simulator, tests),
:func:`run_axpo_step` for asynchronous ones (the workflow). A framework that splits a step across
workers (rllm runs one question per workflow) calls the phases itself, in this order: its
coordinator calls :func:`plan_resampling` once all groups are in and its grouping hook calls
:func:`finish_step`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from axpo_rllm.core.advantages import build_training_rows
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.diagnostics import step_diagnostics
from axpo_rllm.core.failures import check_failure_share
from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.records import QuestionGroup, ResamplePlan, Rollout, TrainingRow

__all__ = ["StepOutcome", "finish_step", "axpo_step", "run_axpo_step"]


@dataclass
class StepOutcome:
    """What one step produced, phase by phase."""

    groups: list[QuestionGroup]
    plan: ResamplePlan
    continuations: list[Rollout]
    rows: list[TrainingRow]
    diagnostics: dict[str, float]
    """§7, keyed ``axpo/<name>``."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per phase (``phase1_s``, ``plan_s``, ``phase3_s``, ``step_s``) when measured."""


def finish_step(groups: Sequence[QuestionGroup], plan: ResamplePlan, continuations: Sequence[Rollout],
                config: AXPOConfig) -> StepOutcome:
    """Phase 4: the training rows (§6) and the diagnostics (§7) of a planned, resampled step.

    Raises :class:`~axpo_rllm.core.failures.StepFailedError` when more than
    ``config.max_failed_share`` of the step's rollouts failed (the failure policy).
    """
    continuations = list(continuations)
    check_failure_share([r for g in groups for r in g.rollouts] + continuations, config.max_failed_share)
    rows = build_training_rows(groups, plan, continuations, config)
    return StepOutcome(list(groups), plan, continuations, rows, step_diagnostics(groups, plan, continuations, config))


def axpo_step(
    groups: Sequence[QuestionGroup],
    resample: Callable[[ResamplePlan], Sequence[Rollout]],
    config: AXPOConfig,
    step: int = 0,
) -> StepOutcome:
    """Phases 2–4 on phase 1's groups; ``resample`` draws the plan's continuations (phase 3)."""
    plan = plan_resampling(groups, config, step)
    continuations = list(resample(plan)) if plan.jobs else []
    return finish_step(groups, plan, continuations, config)


async def run_axpo_step(
    rollouts: Callable[[], Awaitable[Sequence[QuestionGroup]]],
    resample: Callable[[ResamplePlan], Awaitable[Sequence[Rollout]]],
    config: AXPOConfig,
    step: int = 0,
    on_phase: Callable[[str], None] | None = None,
) -> StepOutcome:
    """Phases 1–4, timed; ``on_phase(name)`` is called as each phase ends (engine counters)."""
    mark = on_phase or (lambda name: None)
    t0 = time.perf_counter()
    groups = list(await rollouts())
    t1 = time.perf_counter()
    mark("rollouts")
    plan = plan_resampling(groups, config, step)
    t2 = time.perf_counter()
    mark("plan")
    continuations = list(await resample(plan)) if plan.jobs else []
    t3 = time.perf_counter()
    mark("resample")
    outcome = finish_step(groups, plan, continuations, config)
    outcome.seconds = {"phase1_s": t1 - t0, "plan_s": t2 - t1, "phase3_s": t3 - t2, "step_s": t3 - t0}
    return outcome

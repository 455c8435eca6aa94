"""The order of an AXPO step's phases, written once.

    phase 1  rollouts      N per question                              (the caller: agent + engine)
    phase 2  plan          §1–§4 -> ResamplePlan                       :func:`plan_resampling`
    phase 3  resample      K token-exact continuations per prefix      (the caller)
    phase 4  advantages    §6 rows + §7 diagnostics                    :func:`finish_step`

:func:`axpo_step` runs the four in order for synchronous callers (the simulator, tests),
:func:`run_axpo_step` for asynchronous ones (the workflow). :func:`run_axpo_step_streaming` is the
same order with phases 2 and 3 started inside phase 1 (``AXPOConfig.streaming``): as each rollout
is graded and each question's group completes, the :class:`~axpo_rllm.core.streaming.StreamingPlanner`
releases the prefixes whose selection is already certain and their continuations start at once;
at the end of phase 1 the plan is completed and the rest of phase 3 runs. A framework that
splits a step across workers (rllm runs one question per workflow) calls the phases itself, in
this order: its coordinator feeds the streaming planner (or calls :func:`plan_resampling` once all
groups are in) and its grouping hook calls :func:`finish_step`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from axpo_rllm.core.advantages import build_training_rows
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.diagnostics import step_diagnostics
from axpo_rllm.core.failures import check_failure_share
from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.records import QuestionGroup, ResampleJob, ResamplePlan, Rollout, TrainingRow
from axpo_rllm.core.streaming import StreamingPlanner

__all__ = ["StepOutcome", "PhaseOneReport", "finish_step", "axpo_step", "run_axpo_step", "run_axpo_step_streaming",
           "in_plan_order"]


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
    """Wall time per phase (``phase1_s``, ``plan_s``, ``phase3_s``, ``step_s``) when measured;
    streaming adds ``first_release_s`` (step start to the first continuation's start) and counts
    ``jobs_early`` (prefixes whose continuations started before phase 1 ended and were kept),
    ``speculated_jobs`` (starts before certainty) and ``speculation_wasted_jobs`` (cancelled starts)."""


@dataclass(frozen=True)
class PhaseOneReport:
    """What phase 1 tells the streaming planner as it runs (each call may start continuations)."""

    first_call: Callable[[str, str, float | None], None]
    """``(question_id, rollout_id, c_s)``: an original rollout's first tool call has ended (None:
    forget it). The rollout must then not be retried: its retry would be another rollout than the
    one the plan may already rely on."""
    rollout: Callable[[Rollout], None]
    """An original rollout is graded."""
    group: Callable[[QuestionGroup], None]
    """A question's N rollouts are all graded."""


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


async def run_axpo_step_streaming(
    questions: Sequence[str],
    rollouts: Callable[[PhaseOneReport], Awaitable[Sequence[QuestionGroup]]],
    resample: Callable[[Sequence[ResampleJob]], Awaitable[Sequence[Rollout]]],
    config: AXPOConfig,
    group_size: int,
    step: int = 0,
    on_phase: Callable[[str], None] | None = None,
) -> StepOutcome:
    """Phases 1–4 with phase 3 started inside phase 1 (``config.streaming``: ``exact`` or ``greedy``).

    ``questions``: the step's question ids in plan order (the task order). ``rollouts(report)``
    runs phase 1, telling ``report`` (:class:`PhaseOneReport`) each first tool call and each graded
    rollout (both optional: they sharpen the rule) and each question's complete group, and
    returns the groups in ``questions`` order. ``resample(jobs)`` draws the K continuations of some
    jobs; it is called for each job as it starts (certain, or speculative with
    ``config.speculation``: such a call is cancelled if the plan does not take its job, and must
    then leave nothing behind) and after phase 1 for the rest. The continuations come back in plan
    order, as :func:`run_axpo_step` returns them.
    """
    mark = on_phase or (lambda name: None)
    planner = StreamingPlanner(config, len(questions), group_size, step, order=questions)
    running: dict[str, asyncio.Future] = {}
    t0 = time.perf_counter()
    first_release: list[float] = []

    def start(jobs: Sequence[ResampleJob]) -> None:
        for job_id in planner.take_cancelled():  # speculation: the plan can no longer take these
            running.pop(job_id).cancel()
        if jobs:
            first_release.append(time.perf_counter())
        for job in jobs:  # one task per prefix: a speculative start can be cancelled alone
            running[job.job_id] = asyncio.ensure_future(resample([job]))

    try:
        report = PhaseOneReport(
            first_call=lambda q, rid, c: start(planner.observe_call(q, rid, c)),
            rollout=lambda r: start(planner.observe(r)),
            group=lambda g: start(planner.add(g)),
        )
        groups = list(await rollouts(report))
        t1 = time.perf_counter()
        mark("rollouts")
        plan = planner.finish()
        early = len(planner.started)
        t2 = time.perf_counter()
        mark("plan")
        start(planner.remaining(plan))
        drawn = [c for batch in await asyncio.gather(*running.values()) for c in batch]
    finally:
        for task in running.values():
            task.cancel()
    t3 = time.perf_counter()
    mark("resample")
    if [g.question_id for g in groups] != list(questions):
        raise ValueError("rollouts() must return the groups in the order of `questions`")
    outcome = finish_step(groups, plan, in_plan_order(plan, drawn), config)
    outcome.seconds = {
        "phase1_s": t1 - t0, "plan_s": t2 - t1, "phase3_s": t3 - t2, "step_s": t3 - t0,
        "first_release_s": (first_release[0] - t0) if first_release else float("nan"),
        "jobs_early": float(early), "speculated_jobs": float(planner.speculated),
        "speculation_wasted_jobs": float(planner.wasted),
    }
    return outcome


def in_plan_order(plan: ResamplePlan, continuations: Sequence[Rollout]) -> list[Rollout]:
    """Continuations sorted by their job's place in the plan (each job's own order kept)."""
    rank = {job.source_id: i for i, job in enumerate(plan.jobs)}
    return sorted(continuations, key=lambda c: rank.get(c.source_id, len(rank)))

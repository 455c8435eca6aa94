"""The step coordinator: one AXPO plan per step across rllm's per-question workflow runs."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from rllm.types import Episode as RllmEpisode

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.records import QuestionGroup, ResampleJob, ResamplePlan, Rollout
from axpo_rllm.core.step import finish_step
from axpo_rllm.core.streaming import StreamingPlanner

__all__ = ["AXPOStepCoordinator"]


class AXPOStepCoordinator:
    """Collects the B question groups of a step and plans them (docs/algorithm.md §1-4) for every run.

    Share one instance through ``workflow_args``; ``UnifiedWorkflowEngine`` must keep all B runs in
    flight together (``n_parallel_tasks >= questions_per_step``; the launcher checks it). A run that
    cannot deliver its group calls :meth:`abort`, which releases the others at once with the
    reason instead of letting them wait out ``barrier_timeout_s``. Each run hands its episode back
    through :meth:`finish`; with the step's last one the coordinator computes the step's §7
    diagnostics and failure counters (the core's ``finish_step``: a step over the failure bound
    raises here) and writes them into every episode's metrics — rllm logs the mean of episode
    metrics per step, so each logged value is the step's exact figure. ``start_step`` continues a
    resumed run's step count (seeds and random rankings never repeat).

    With ``config.streaming`` ``exact`` or ``greedy`` the coordinator feeds the core's
    :class:`~axpo_rllm.core.streaming.StreamingPlanner` (plan order: sorted question ids, learnt as
    runs report them): runs report each graded rollout (:meth:`observe`) and their group
    (:meth:`submit`), and a run's ``on_jobs`` callback receives its prefixes as soon as their
    selection is certain, before the barrier; the plan at the barrier is the same plan.
    """

    def __init__(self, questions_per_step: int, config: AXPOConfig, barrier_timeout_s: float = 600.0,
                 start_step: int = 0, group_size: int | None = None) -> None:
        if questions_per_step < 1:
            raise ValueError(f"questions_per_step must be >= 1, got {questions_per_step}")
        self.questions_per_step = questions_per_step
        self.config = config
        self.barrier_timeout_s = barrier_timeout_s
        self.group_size = group_size
        """N, which the streaming planner needs up front (E = r·B·N): set by :meth:`bind` (the
        workflow's config) or by the first group submitted (observations before it are skipped)."""
        self.step = int(start_step)
        self._groups: dict[str, QuestionGroup] = {}
        self._plan: ResamplePlan | None = None
        self._ready: asyncio.Event | None = None
        self._handed_out = 0
        self._aborted: str | None = None
        self._steps: dict[int, dict[str, Any]] = {}
        self._planner: StreamingPlanner | None = None
        self._on_jobs: dict[str, Callable[[list[ResampleJob]], None]] = {}
        self._on_cancel: dict[str, Callable[[str], None]] = {}
        self._undelivered: dict[str, dict[str, ResampleJob]] = {}

    @property
    def streaming(self) -> bool:
        return self.config.enable and self.config.streaming != "off"

    def bind(self, group_size: int) -> None:
        """The workflow's N (every run of every step must use the same)."""
        if self.group_size is None:
            self.group_size = group_size
        elif self.group_size != group_size:
            raise ValueError(f"the coordinator plans groups of N = {self.group_size}; this workflow draws {group_size}")

    def _stream(self) -> StreamingPlanner:
        if self._planner is None:
            self._planner = StreamingPlanner(self.config, self.questions_per_step, self.group_size, self.step)
        return self._planner

    def _dispatch(self, jobs: Sequence[ResampleJob]) -> None:
        """Start ``jobs`` in their questions' runs, after stopping what the planner cancelled
        (speculation; job ids are ``<question>/<source>``)."""
        for job_id in self._stream().take_cancelled() if self._planner is not None else ():
            question = job_id.split("/", 1)[0]
            waiting = self._undelivered.get(question, {})
            if job_id in waiting:
                del waiting[job_id]
            elif question in self._on_cancel:
                self._on_cancel[question](job_id)
        for job in jobs:
            self._undelivered.setdefault(job.question_id, {})[job.job_id] = job
        for question in list(self._undelivered):
            self._deliver(question)

    def _deliver(self, question: str) -> None:
        """Hand a question's started jobs to its run once it listens (a run that has not registered
        yet gets them when it does)."""
        callback = self._on_jobs.get(question)
        waiting = self._undelivered.get(question)
        if callback is not None and waiting:
            self._undelivered[question] = {}
            callback(list(waiting.values()))

    def listen(self, question_id: str, on_jobs: Callable[[list[ResampleJob]], None],
               on_cancel: Callable[[str], None]) -> None:
        """A run's callbacks for its question's jobs, registered before its phase 1 so that prefixes
        started while it still runs (speculation on graded rollouts) reach it at once."""
        self._on_jobs[question_id], self._on_cancel[question_id] = on_jobs, on_cancel
        self._deliver(question_id)

    def observe(self, rollout: Rollout) -> None:
        """One graded rollout of a question still running (streaming only; a no-op otherwise)."""
        if self.streaming and self.group_size is not None:
            self._dispatch(self._stream().observe(rollout))

    def observe_call(self, question_id: str, rollout_id: str, confidence: float | None) -> None:
        """A running rollout's first tool call (streaming only; see ``StreamingPlanner.observe_call``)."""
        if self.streaming and self.group_size is not None:
            self._dispatch(self._stream().observe_call(question_id, rollout_id, confidence))

    async def submit(self, group: QuestionGroup,
                     on_jobs: Callable[[list[ResampleJob]], None] | None = None,
                     on_cancel: Callable[[str], None] | None = None) -> tuple[ResamplePlan, int]:
        """Register one question's group; return the step's plan (and step number) once all are in.

        ``on_jobs`` (streaming) is called with this question's jobs as soon as they start: certain
        ones, possibly right away and always before this returns, are in the plan; with
        ``config.speculation`` also likely ones, and ``on_cancel(job_id)`` stops one the plan will not
        take (before this returns). Every job ``on_jobs`` got and ``on_cancel`` did not is in the plan.
        """
        if self._ready is None:
            self._ready = asyncio.Event()
        if group.question_id in self._groups:
            raise ValueError(f"question {group.question_id!r} submitted twice in step {self.step}")
        self._groups[group.question_id] = group
        ready, step = self._ready, self.step
        if self.streaming:
            self.bind(len(group.rollouts))
            if on_jobs is not None:
                self.listen(group.question_id, on_jobs, on_cancel or (lambda job_id: None))
            self._dispatch(self._stream().add(group))
        if len(self._groups) == self.questions_per_step:
            ordered = [self._groups[q] for q in sorted(self._groups)]
            self._plan = self._stream().finish() if self.streaming else plan_resampling(ordered, self.config, self.step)
            if self.streaming:
                self._dispatch([])  # speculative starts the plan did not take
            self._steps[step] = {"groups": ordered, "plan": self._plan, "episodes": [], "continuations": []}
            ready.set()
        try:
            await asyncio.wait_for(ready.wait(), self.barrier_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"AXPO step {self.step}: only {len(self._groups)} of {self.questions_per_step} questions arrived "
                f"within {self.barrier_timeout_s:g}s; run rllm with n_parallel_tasks >= the number of questions per step "
                "and rollout.n = 1 (the workflow draws the N rollouts itself)"
            ) from None
        if self._aborted is not None:
            raise RuntimeError(f"AXPO step {step} cannot be planned: {self._aborted}")
        plan = self._plan
        self._handed_out += 1
        if self._handed_out == self.questions_per_step:  # everyone has it: open the next step
            self._groups, self._plan, self._ready, self._handed_out = {}, None, None, 0
            self._planner, self._on_jobs, self._on_cancel, self._undelivered = None, {}, {}, {}
            self.step += 1
        return plan, step

    def abort(self, question_id: str, reason: str) -> None:
        """A run failed before delivering its group: release every waiter of the step with the reason."""
        self._aborted = f"question {question_id!r} failed before its group was in ({reason})"
        if self._ready is None:
            self._ready = asyncio.Event()
        self._ready.set()

    def finish(self, step: int, episode: RllmEpisode, continuations: Sequence[Rollout]) -> None:
        """One run's episode is done; after the step's last, write the step's diagnostics into all of them."""
        record = self._steps[step]
        record["episodes"].append(episode)
        record["continuations"].extend(continuations)
        if len(record["episodes"]) < self.questions_per_step:
            return
        del self._steps[step]
        outcome = finish_step(record["groups"], record["plan"], record["continuations"], self.config)
        for ep in record["episodes"]:
            ep.metrics.update({k: float(v) for k, v in outcome.diagnostics.items()})

"""The AXPO workflow as an rllm ``Workflow`` (rllm-org/rllm 0.3.0.pre; docs/upstream.md §4). Thin, at the edge.

How the batch-level algorithm fits rllm's per-task workflows:

- one ``Workflow.run(task, uid)`` is one **question** (run rllm with ``rollout.n = 1``): it runs the
  question's N episodes, hands its :class:`QuestionGroup` to the shared :class:`AXPOStepCoordinator`
  and waits; when all B questions of the step are in, the coordinator runs the core's planner once
  (the r·B·N budget is batch-wide, breadth-first) and every run draws the K continuations of *its*
  selected prefixes, then returns an rllm ``Episode`` with N + K·(its prefixes) trajectories;
- :func:`axpo_traj_grouping_hook` (rllm's ``traj_grouping_hook``) rebuilds the core's training rows
  from the episodes (``build_training_rows``: recovery reward, separate continuation groups, masks)
  and hands them over as ``TrajectoryGroup`` s with group ids ``<advantage group>:axpo``; every
  trajectory keeps only its loss window (a continuation's prefix becomes prompt, a credited
  source is cut after its prefix), its reward is the row's score;
- the estimator ``axpo`` is registered with rllm's registry when this module is imported (the
  workflow imports it, so every Ray actor that runs the workflow has it); select it with the
  per-role map ``algorithm.estimator_map = {"axpo": "axpo"}`` (a global ``adv_estimator: axpo``
  falls back to an enum and fails).

The pieces live in their own modules and are re-exported here (the public import path):
:mod:`~axpo_rllm.integrations.rllm.estimator` (the ``axpo`` estimator, registered on import),
:mod:`~axpo_rllm.integrations.rllm.coordinator` (one plan per step),
:mod:`~axpo_rllm.integrations.rllm.trajectories` (rollouts as rllm trajectories, the grouping hook),
:mod:`~axpo_rllm.integrations.rllm.engine_adapters` (engines across the seam); this module holds
the workflow itself.

Importing this module needs rllm (``pytest.importorskip("rllm")`` in tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Any, Callable

from rllm.types import Episode as RllmEpisode
from rllm.workflows.workflow import TerminationReason, Workflow

from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.records import QuestionGroup, ResampleJob, ResamplePlan, Rollout, Task
from axpo_rllm.core.step import in_plan_order
from axpo_rllm.engines.vision import TrainingInputs
from axpo_rllm.envs.adapters.rllm import task_from_dict
from axpo_rllm.integrations.rllm.coordinator import AXPOStepCoordinator
from axpo_rllm.integrations.rllm.engine_adapters import AxpoRllmEngine, RllmTokenEngine
from axpo_rllm.integrations.rllm.estimator import AXPO_ESTIMATOR, AXPO_ROLE, axpo_advantages
from axpo_rllm.integrations.rllm.trajectories import axpo_traj_grouping_hook, check_question_runs, rollout_to_trajectory
from axpo_rllm.integrations.verl.batch import VisionProcessing

__all__ = [
    "AXPO_ROLE",
    "AXPO_ESTIMATOR",
    "AXPOStepCoordinator",
    "AXPORllmWorkflow",
    "axpo_traj_grouping_hook",
    "check_question_runs",
    "axpo_advantages",
    "rollout_to_trajectory",
    "RllmTokenEngine",
    "AxpoRllmEngine",
]

VALIDATION_STEP = -1
"""The step number validation rollouts are seeded with (the same seeds at every validation)."""


class AXPORllmWorkflow(Workflow):
    """One question per run: N episodes, the shared plan, this question's K continuations per prefix.

    ``workflow_args``: ``coordinator`` (shared :class:`AXPOStepCoordinator`), ``chat`` (a
    :class:`ChatFormat` or the model's tokenizer/processor), ``env_factory`` (a callable returning
    a fresh ``MultimodalToolEnv``), ``config`` (:class:`WorkflowConfig`; its ``axpo`` must be the
    coordinator's), ``vision`` (:class:`VisionProcessing`: needed as soon as a rollout has images,
    so that its trajectories carry expanded ids and every image's features).
    """

    def __init__(self, rollout_engine, executor, *, coordinator: AXPOStepCoordinator, chat: Any,
                 env_factory: Callable[[], Any], config: WorkflowConfig, vision: VisionProcessing | None = None,
                 **kwargs) -> None:
        super().__init__(rollout_engine, executor, **kwargs)
        if config.axpo != coordinator.config:
            raise ValueError("the workflow's AXPOConfig must be the coordinator's (one plan per step)")
        chat = chat if isinstance(chat, ChatFormat) else ChatFormat(chat)
        engine = rollout_engine.inner if isinstance(rollout_engine, AxpoRllmEngine) else RllmTokenEngine(rollout_engine)
        coordinator.bind(config.n)
        self.coordinator = coordinator
        self.vision = vision
        self._rllm_engine = rollout_engine  # rllm sets is_validation on it for validation batches
        self.axpo = AXPOWorkflow(engine, chat, env_factory, config)

    def _expand(self, rollout: Rollout) -> TrainingInputs | None:
        if not rollout.images or self.vision is None:
            return None
        return self.vision.expand(list(rollout.prompt_ids) + list(rollout.response_ids), rollout.images)

    def is_multithread_safe(self) -> bool:
        return True  # every episode builds its own env; tools shared by env_factory are thread-safe

    def reset(self, task: dict | None = None, uid: str | None = None):
        self.task, self.uid = task, uid
        self._completed_trajectories = []

    async def run(self, task: dict, uid: str, **kwargs) -> RllmEpisode:
        axpo_task = task if isinstance(task, Task) else task_from_dict(task)
        self.task, self.uid = task, uid
        if getattr(self._rllm_engine, "is_validation", False):
            return await self._validate(task, uid, axpo_task)
        limit = asyncio.Semaphore(self.axpo.config.max_concurrency)
        counters: Counter[str] = Counter()
        t0 = time.perf_counter()
        step = self.coordinator.step
        tasks = {axpo_task.task_id: axpo_task}
        early: dict[str, asyncio.Future] = {}

        def on_jobs(jobs: list[ResampleJob]) -> None:  # started before the barrier (certain or speculative)
            for job in jobs:
                early[job.job_id] = asyncio.ensure_future(self.axpo.continuations([job], tasks, step, limit, counters))

        def on_cancel(job_id: str) -> None:  # a speculative start the plan will not take
            early.pop(job_id).cancel()

        if self.coordinator.streaming:
            self.coordinator.listen(axpo_task.task_id, on_jobs, on_cancel)

        try:
            try:
                originals = await self.axpo.originals(axpo_task, step, limit, counters, self.coordinator.observe,
                                                      self.coordinator.observe_call)
            except BaseException as exc:  # release the other runs of the step with the reason
                self.coordinator.abort(axpo_task.task_id, f"{type(exc).__name__}: {exc}")
                raise
            group = QuestionGroup(axpo_task.task_id, tuple(e.rollout for e in originals))
            plan, plan_step = await self.coordinator.submit(group, on_jobs, on_cancel)
            if plan_step != step:
                raise RuntimeError(f"question {axpo_task.task_id} started in step {step} but was planned in step {plan_step}")
            mine = [job for job in plan.jobs if job.question_id == axpo_task.task_id]
            rest = self.axpo.continuations([j for j in mine if j.job_id not in early], tasks, step, limit, counters)
            drawn = [e for batch in await asyncio.gather(*early.values(), rest) for e in batch]
        finally:
            for future in early.values():
                future.cancel()
        order = {c.rollout_id: i for i, c in enumerate(in_plan_order(plan, [e.rollout for e in drawn]))}
        conts = sorted(drawn, key=lambda e: order[e.rollout.rollout_id])
        metrics_early = float(len(early))
        trajectories = [rollout_to_trajectory(e.rollout, inputs=self._expand(e.rollout)) for e in list(originals) + list(conts)]
        metrics = self.axpo.episode_metrics(originals, conts, ResamplePlan(plan.budget, tuple(mine), plan.triggered, ()), counters)
        metrics["workflow/question_s"] = time.perf_counter() - t0
        metrics["workflow/jobs_early"] = metrics_early
        episode = RllmEpisode(
            id=uid, task=task, trajectories=trajectories,
            metadata={"axpo_plan": plan, "axpo_config": self.axpo.config.axpo, "axpo_step": step, "axpo_metrics": metrics},
        )
        episode = self.postprocess_episode(episode, TerminationReason.ENV_DONE)
        episode.metrics.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        self.coordinator.finish(step, episode, [e.rollout for e in conts])
        return episode

    async def _validate(self, task: dict, uid: str, axpo_task: Task) -> RllmEpisode:
        """Validation (rllm runs it with this workflow, ``n_val`` runs per task): one plain rollout per
        run — no resampling, no barrier, any batch size; rollout ``<task_id>#<rollout index>``."""
        index = int(uid.rsplit(":", 1)[1]) if ":" in uid and uid.rsplit(":", 1)[1].isdigit() else 0
        episode_ = await self.axpo.original(axpo_task, index, VALIDATION_STEP, asyncio.Semaphore(1), Counter())
        rollout = episode_.rollout
        config = dataclasses.replace(self.axpo.config.axpo, enable=False)
        episode = RllmEpisode(
            id=uid, task=task, trajectories=[rollout_to_trajectory(rollout, inputs=self._expand(rollout))],
            metadata={"axpo_plan": ResamplePlan(0, (), (), ()), "axpo_config": config, "axpo_step": "validation"},
        )
        episode = self.postprocess_episode(episode, TerminationReason.ENV_DONE)
        episode.metrics.update({"val/tool_use": float(rollout.used_tool), "val/turns": float(rollout.turns),
                                "val/failed": float(rollout.termination.value == "error")})
        return episode

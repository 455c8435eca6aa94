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

Engines: :class:`RllmTokenEngine` puts an rllm ``RolloutEngine`` (token-in/token-out, e.g. rllm's
``VerlEngine``) behind this project's engine interface, routing the K continuations of a prefix
with one ``application_id`` so they reach the same server (prefix cache); :class:`AxpoRllmEngine`
does the reverse (this project's engines as an rllm ``RolloutEngine``).

Importing this module needs rllm (``pytest.importorskip("rllm")`` in tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rllm.engine.rollout.rollout_engine import ModelOutput
from rllm.engine.rollout.rollout_engine import RolloutEngine as RllmRolloutEngine
from rllm.trainer.algorithms.advantage import register_rllm_adv_estimator
from rllm.types import Episode as RllmEpisode
from rllm.types import Step, Trajectory, TrajectoryGroup
from rllm.workflows.workflow import TerminationReason, Workflow

from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.advantages import group_normalize, original_groups
from axpo_rllm.core.config import AXPOConfig, std_normalization
from axpo_rllm.core.failures import StepFailedError
from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.records import QuestionGroup, ResampleJob, ResamplePlan, Rollout, RolloutKind, Task, TrainingRow
from axpo_rllm.core.step import finish_step, in_plan_order
from axpo_rllm.core.streaming import StreamingPlanner
from axpo_rllm.engines.base import GenerationRequest, GenerationResult, RolloutEngine
from axpo_rllm.engines.vision import TrainingInputs, first_images
from axpo_rllm.envs.adapters.rllm import task_from_dict
from axpo_rllm.integrations.rllm.sampling import result_from_token_output, verl_sampling_kwargs
from axpo_rllm.integrations.verl.batch import VisionProcessing

__all__ = [
    "AXPO_ROLE",
    "AXPO_ESTIMATOR",
    "AXPOStepCoordinator",
    "AXPORllmWorkflow",
    "axpo_traj_grouping_hook",
    "axpo_advantages",
    "rollout_to_trajectory",
    "RllmTokenEngine",
    "AxpoRllmEngine",
]

AXPO_ROLE = "axpo"
"""The group role of every AXPO trajectory group (``group_id = "<advantage group>:axpo"``)."""
AXPO_ESTIMATOR = "axpo"
VALIDATION_STEP = -1
"""The step number validation rollouts are seeded with (the same seeds at every validation)."""


# ---------------------------------------------------------------------------------------------
# The estimator: one scalar advantage per trajectory (rllm broadcasts it over the row's tokens).
# ---------------------------------------------------------------------------------------------
@register_rllm_adv_estimator(AXPO_ESTIMATOR)
def axpo_advantages(rewards: list[np.ndarray], algorithm_config: Any, **kwargs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """docs/algorithm.md §6 on the grouping hook's groups.

    The hook already made the groups AXPO's (continuation groups per prefix, the source's reward
    replaced by r_prefix), so what is left is GRPO's normalisation inside each group, with the
    core's settings. When the hook stored the core's own per-row advantage it is returned as is
    (the core is the single source of truth); either way the two agree.
    """
    groups: Sequence[TrajectoryGroup] = kwargs.get("traj_groups") or [None] * len(rewards)
    advantages = []
    for group_rewards, group in zip(rewards, groups):
        stored = [((t.metadata or {}).get("axpo_advantage")) for t in group.trajectories] if group is not None else [None]
        if group is not None and all(a is not None for a in stored):
            advantages.append(np.asarray(stored, dtype=np.float64))
            continue
        cfg = _group_config(group)
        # the run's AXPOConfig already holds verl's norm_adv_by_std_in_grpo (AXPOConfig.from_algorithm)
        norm_by_std = cfg.norm_by_std if cfg is not None else std_normalization(algorithm_config)
        cfg = cfg or AXPOConfig()
        scores = np.asarray(group_rewards, dtype=np.float32)
        index = np.zeros(len(scores), dtype=np.int64)
        adv = group_normalize(
            torch.from_numpy(scores), torch.from_numpy(index), epsilon=cfg.epsilon,
            norm_by_std=norm_by_std, unbiased=cfg.std_unbiased,
        )
        advantages.append(adv.numpy().astype(np.float64))
    return advantages, advantages


def _group_config(group: TrajectoryGroup | None) -> AXPOConfig | None:
    for meta in (group.metadata if group is not None else []) or []:
        if isinstance(meta, dict) and isinstance(meta.get("axpo_config"), AXPOConfig):
            return meta["axpo_config"]
    return None


# ---------------------------------------------------------------------------------------------
# Batch-level coordination of per-question runs
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Records -> rllm types
# ---------------------------------------------------------------------------------------------
def rollout_to_trajectory(
    rollout: Rollout,
    window: tuple[int, int] | None = None,
    inputs: TrainingInputs | None = None,
    name: str = "axpo",
) -> Trajectory:
    """An rllm ``Trajectory`` whose steps are the rollout's model-token runs inside ``window``.

    Step ``i``'s prompt is ``prompt + response[:start_i]`` exactly, so rllm's merge of
    prefix-extending steps rebuilds one row with observation tokens masked; tokens before the
    window become prompt (a continuation's prefix is context, not action).

    With images the ids are processor-expanded as rllm's own ``VerlEngine`` stores them:
    ``inputs`` is the whole rollout expanded (:meth:`VisionProcessing.expand`), every step's ids
    come from it, and every step carries the ``multi_modal_inputs`` of all the images the row refers
    to — task images, then tool images, in order — because rllm keeps only a merged row's first
    step's inputs. A rollout with images and no ``inputs`` is refused (its features would be lost).
    """
    start, end = window if window is not None else (0, len(rollout.response_ids))
    mask = rollout.response_mask[start:end].astype(bool)
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((start + i, start + j))
            i = j
        else:
            i += 1
    n_images = sum(1 for off in rollout.image_offsets if off < end)
    if n_images and inputs is None:
        raise ValueError(
            f"rollout {rollout.rollout_id} refers to {n_images} image(s): build its trajectory with the "
            "processor-expanded inputs (AXPORllmWorkflow(vision=VisionProcessing(...)))"
        )
    n_prompt = len(rollout.prompt_ids)
    if inputs is not None:
        ids, where = inputs.input_ids, inputs.index
        mm = first_images(inputs.multi_modal_inputs, n_images) or None
        at = lambda k: where[n_prompt + k] if n_prompt + k < len(where) else len(ids)  # noqa: E731
    else:
        ids = [int(t) for t in rollout.prompt_ids] + [int(t) for t in rollout.response_ids]
        mm = None
        at = lambda k: n_prompt + k  # noqa: E731
    steps = []
    for k, (a, b) in enumerate(runs):
        # model tokens are never image pads, so a run stays contiguous in the expanded ids
        prompt_ids, completion = list(ids[: at(a)]), list(ids[at(a) : at(b - 1) + 1])
        output = ModelOutput(
            prompt_ids=prompt_ids,
            completion_ids=completion,
            logprobs=[float(x) for x in rollout.response_logprobs[a:b]],
            multi_modal_inputs=mm,
            prompt_length=len(prompt_ids),
            completion_length=len(completion),
            finish_reason="stop",
        )
        steps.append(Step(
            prompt_ids=output.prompt_ids, response_ids=output.completion_ids, logprobs=output.logprobs,
            model_output=output, reward=float(rollout.reward) if k == len(runs) - 1 else 0.0,
            done=k == len(runs) - 1, chat_completions=[{"role": "assistant", "content": ""}],
        ))
    return Trajectory(
        uid=rollout.rollout_id, name=name, steps=steps, reward=float(rollout.reward),
        metadata={"axpo_rollout": rollout, "axpo_window": (start, end), "axpo_inputs": inputs},
    )


def check_question_runs(episodes: Sequence[RllmEpisode]) -> None:
    """Stop the step, before anything trains, when a question run did not deliver its episode.

    AXPO's runs never fail for a rollout's fault (a failed rollout is recorded and kept out of the
    loss); a run fails only when the step cannot go on: the failure share passed its bound, the
    plan could not be made, the task could not be built, rllm's workflow timeout cut it. rllm then
    hands over an episode of its own (termination ``error`` or ``timeout``, the exception in
    ``info["error"]``; the launcher sets ``rllm.workflow.raise_on_error: false`` so that it does,
    and ``retry_limit: 1`` so that a question is never planned twice). Training on the rest would
    train on a step whose plan, budget and statistics assumed the missing questions.
    """
    broken = [ep for ep in episodes if "axpo_plan" not in (ep.metadata or {})]
    if not broken:
        return
    reasons = []
    for ep in broken:
        error = (getattr(ep, "info", None) or {}).get("error") or {}
        reason = getattr(ep.termination_reason, "value", ep.termination_reason)
        detail = f"{error.get('error_type', '')}: {error.get('error_message', '')}" if error else "no AXPO episode"
        task = ep.task if isinstance(ep.task, dict) else {}
        reasons.append(f"question {task.get('task_id') or task.get('id') or ep.id} ({reason}) {detail}")
    raise StepFailedError(f"{len(broken)} of {len(episodes)} question runs of the step failed, nothing of the step "
                          f"is trained: " + "; ".join(r[:1500] for r in reasons))


def axpo_traj_grouping_hook(episodes: list[RllmEpisode], transform_config: Any = None,
                            compact_filtering_config: Any = None) -> list[TrajectoryGroup]:
    """rllm's ``traj_grouping_hook``: the core's training rows as ``TrajectoryGroup`` s (role ``axpo``).

    Every episode's trajectories are reused (rllm checks they are not copies): each is cut to its
    row's loss window, its reward set to the row's score (r_prefix for a credited source) and the
    core's advantage stored in ``metadata["axpo_advantage"]``. A fully masked row (an over-turn
    rollout under the ``mask`` cap policy) keeps its place in its group with no steps.
    """
    check_question_runs(episodes)
    by_step: dict[int, list[RllmEpisode]] = {}
    for ep in episodes:
        by_step.setdefault(ep.metadata["axpo_step"], []).append(ep)
    groups: list[TrajectoryGroup] = []
    for _, eps in sorted(by_step.items(), key=lambda item: str(item[0])):
        plan: ResamplePlan = eps[0].metadata["axpo_plan"]
        config: AXPOConfig = eps[0].metadata["axpo_config"]
        trajs = {t.metadata["axpo_rollout"].rollout_id: t for ep in eps for t in ep.trajectories}
        rollouts = [t.metadata["axpo_rollout"] for t in trajs.values()]
        originals = [r for r in rollouts if r.kind is RolloutKind.ORIGINAL]
        conts = [r for r in rollouts if r.kind is RolloutKind.CONTINUATION]
        rows = finish_step(original_groups(originals), plan, conts, config).rows  # phase 4 (core.step)
        members: dict[str, list[tuple[TrainingRow, Trajectory]]] = {}
        for row in rows:
            if len(row.segments) > 1:
                raise ValueError("source_tail=keep puts two advantages on one row; rllm carries one per trajectory")
            traj = trajs[row.rollout.rollout_id]
            window = (row.segments[0].start, row.segments[0].end) if row.segments else None
            fresh = rollout_to_trajectory(row.rollout, window, traj.metadata.get("axpo_inputs")) if window else None
            traj.steps = fresh.steps if fresh is not None else []
            traj.reward = float(row.score)
            traj.metadata = {**(traj.metadata or {}), "axpo_role": row.role.value,
                             "axpo_advantage": float(row.segments[0].advantage) if row.segments else 0.0,
                             "axpo_window": window}
            members.setdefault(row.adv_group, []).append((row, traj))
        for adv_group, items in members.items():
            groups.append(TrajectoryGroup(
                trajectories=[t for _, t in items],
                group_id=f"{adv_group.replace('::', '/').replace(':', '/')}:{AXPO_ROLE}",
                metadata=[{"axpo_role": row.role.value, "rollout_id": row.rollout.rollout_id, "axpo_config": config}
                          for row, _ in items],
            ))
    return groups


# ---------------------------------------------------------------------------------------------
# Engines across the seam
# ---------------------------------------------------------------------------------------------
class RllmTokenEngine(RolloutEngine):
    """An rllm token-in/token-out ``RolloutEngine`` (e.g. ``VerlEngine``) behind this project's interface.

    Requests of one rollout family (a source and its K continuations) share one ``application_id``:
    verl routes equal ids to the same server, so continuations find their prefix in its cache.
    """

    def __init__(self, rllm_engine: RllmRolloutEngine) -> None:
        if not getattr(rllm_engine, "supports_token_in_token_out", False):
            raise ValueError(f"{type(rllm_engine).__name__} does not support token-in/token-out generation")
        self.rllm_engine = rllm_engine

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        family = request.request_id.split("/", 1)[0].split("~", 1)[0]
        kwargs = verl_sampling_kwargs(request, f"axpo-{family}" if family else None)
        out = await self.rllm_engine.get_token_output_from_token_input(token_input=list(request.prompt_ids), **kwargs)
        return result_from_token_output(request, out)

    async def score(self, prompt_ids, images, continuation_ids) -> list[float]:
        raise NotImplementedError("teacher-forced scoring is not part of rllm's RolloutEngine interface")


class _TokenOutput:
    """The fields of verl's ``TokenOutput`` that rllm reads (no verl import needed)."""

    def __init__(self, token_ids, log_probs, stop_reason) -> None:
        self.token_ids, self.log_probs, self.stop_reason = token_ids, log_probs, stop_reason


class AxpoRllmEngine(RllmRolloutEngine):
    """This project's engine (vLLM-CPU, transformers, HTTP) as an rllm ``RolloutEngine``."""

    def __init__(self, engine: RolloutEngine, chat: ChatFormat, max_tokens: int = 512, **sampling: Any) -> None:
        super().__init__()
        self.inner = engine
        self.chat = chat
        self.tokenizer = chat.tokenizer
        self.max_tokens = max_tokens
        self.sampling = sampling

    @property
    def supports_token_in_token_out(self) -> bool:
        return True

    def _request(self, token_input: Sequence[int], kwargs: dict) -> GenerationRequest:
        images = kwargs.pop("image_data", None) or ()
        kwargs.pop("application_id", None)
        params = {**self.sampling, **kwargs}
        return GenerationRequest(
            prompt_ids=tuple(token_input), images=tuple(images), max_tokens=int(params.pop("max_tokens", self.max_tokens)),
            temperature=float(params.pop("temperature", 1.0)), top_p=float(params.pop("top_p", 1.0)),
            seed=params.pop("seed", None), stop=tuple(params.pop("stop", ()) or ()),
        )

    async def get_token_output_from_token_input(self, token_input, **kwargs):
        result = await self.inner.generate(self._request(token_input, dict(kwargs)))
        return _TokenOutput(list(result.token_ids), list(result.logprobs), "length" if result.finish_reason == "length" else "stop")

    async def _get_model_response(self, messages: list[dict], **kwargs) -> ModelOutput:
        tools = kwargs.pop("tools", None)
        images = [part.get("image") for m in messages if isinstance(m.get("content"), list) for part in m["content"]
                  if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None]
        text = self.chat.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        prompt = self.chat.encode(text)
        kwargs["image_data"] = images
        result = await self.inner.generate(self._request(prompt, kwargs))
        completion = self.chat.decode(result.token_ids)
        return ModelOutput(
            text=completion, content=completion, prompt_ids=prompt, completion_ids=list(result.token_ids),
            logprobs=list(result.logprobs), prompt_length=len(prompt), completion_length=len(result.token_ids),
            finish_reason=result.finish_reason,
        )


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------
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

"""The AXPO workflow for one training step (batch level), framework-free.

    phase 1  N episodes for each of the B questions, all concurrent      -> QuestionGroup x B
    phase 2  the core's planner picks prefixes under E = floor(r·B·N)    -> ResamplePlan
    phase 3  K continuations per prefix, token-exact (prompt + prefix ids, same images), rolled
             forward through the remaining turns, verified                -> continuation Rollouts
    output   the core's group builder -> TrainingRows (``axpo_rllm.integrations.verl.batch`` makes
             a verl ``DataProto`` of them)

The phase order is the core's (:func:`axpo_rllm.core.step.run_axpo_step`); this module supplies
phases 1 and 3. With ``AXPOConfig.streaming`` ``exact`` (the default) or ``greedy`` the step is
:func:`~axpo_rllm.core.step.run_axpo_step_streaming`: every graded rollout and every completed
question is reported to the core's streaming planner, and the K continuations of each prefix
start as soon as its selection is certain (``exact``: the same plan, and the same tokens, as the
batch barrier) instead of after the slowest rollout of the batch. With streaming the engine's
prefix-cache counters are split at the end of phase 1, so the "phase 1" figures include the
continuations that started early.

GRPO is the same workflow with ``AXPOConfig(enable=False)`` (phases 2-3 off). A rollout that fails
(engine error, env/tool crash, timeout) is retried ``rollout_retries`` times, then recorded with
``Termination.ERROR`` and its reason and counted in the metrics: never dropped, so every question
keeps N rollouts and every selected prefix gets exactly K continuations (the budget stays exact).

The K continuations of a prefix are issued together on one engine, so the engine serves the
shared ``prompt + prefix`` from its prefix cache (vLLM keys the cache on the image hashes too).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from axpo_rllm.agents.agent import Agent, AgentConfig, ChatFormat, Episode, EpisodeStats, derive_seed
from axpo_rllm.core.advantages import original_groups
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.records import QuestionGroup, ResampleJob, ResamplePlan, Rollout, RolloutKind, Task, Termination, TrainingRow
from axpo_rllm.core.step import PhaseOneReport, run_axpo_step, run_axpo_step_streaming
from axpo_rllm.engines.base import RolloutEngine
from axpo_rllm.envs.env import MultimodalToolEnv, build_tools
from axpo_rllm.envs.tools.sandbox import ISOLATION_LEVELS

__all__ = ["WorkflowConfig", "StepResult", "AXPOWorkflow", "default_env_factory"]


@dataclass(frozen=True)
class WorkflowConfig:
    n: int = 8
    """Rollouts per question (N; ``2N`` with AXPO off is the 'rollout 2x' baseline)."""
    axpo: AXPOConfig = field(default_factory=AXPOConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    max_concurrency: int = 256
    """Episodes in flight at once (the engine batches whatever is in flight)."""
    rollout_retries: int = 1
    """Re-runs of an episode that ended in ``Termination.ERROR`` before it is recorded as failed."""
    rollout_timeout_s: float | None = 900.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"WorkflowConfig.n must be >= 1, got {self.n}")
        if self.rollout_retries < 0:
            raise ValueError(f"WorkflowConfig.rollout_retries must be >= 0, got {self.rollout_retries}")


@dataclass
class StepResult:
    step: int
    groups: list[QuestionGroup]
    plan: ResamplePlan
    continuations: list[Rollout]
    rows: list[TrainingRow]
    metrics: dict[str, float]
    stats: dict[str, EpisodeStats]
    """Per rollout id: the episode's counters (requests, tokens, cache hits, malformed calls ...)."""

    @property
    def rollouts(self) -> list[Rollout]:
        return [r for g in self.groups for r in g.rollouts] + list(self.continuations)


def default_env_factory(tools: Sequence[str] = ("crop",), grader=None, call_timeout_s: float = 60.0) -> Callable[[], Any]:
    """Environments sharing one set of tool instances (their clients and pools) and one grader."""
    shared = build_tools(list(tools))
    return lambda: MultimodalToolEnv(tools=shared, grader=grader, call_timeout_s=call_timeout_s)


class AXPOWorkflow:
    """Runs AXPO (or GRPO) steps: ``await workflow.arun_step(tasks, step)``."""

    def __init__(
        self,
        engine: RolloutEngine,
        chat: ChatFormat,
        env_factory: Callable[[], Any],
        config: WorkflowConfig = WorkflowConfig(),
    ) -> None:
        self.engine = engine
        self.chat = chat
        self.env_factory = env_factory
        self.config = config
        self.agent = Agent(engine, chat, config.agent)

    def run_step(self, tasks: Sequence[Task], step: int = 0) -> StepResult:
        return asyncio.run(self.arun_step(tasks, step))

    async def arun_step(self, tasks: Sequence[Task], step: int = 0) -> StepResult:
        cfg = self.config
        ids = [t.task_id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task ids repeat within the step: {sorted(i for i, c in Counter(ids).items() if c > 1)}")
        limit = asyncio.Semaphore(cfg.max_concurrency)
        counters: Counter[str] = Counter()
        episodes: dict[str, list[Episode]] = {}
        cache = {"start": self._cache_counters()}

        async def rollouts() -> list[QuestionGroup]:  # phase 1: N episodes per question, all in flight
            episodes["originals"] = [e for q in await asyncio.gather(*(self.originals(t, step, limit, counters) for t in tasks)) for e in q]
            return original_groups(e.rollout for e in episodes["originals"])

        async def streamed(report: PhaseOneReport) -> list[QuestionGroup]:  # phase 1, reporting as it goes
            async def question(task: Task) -> list[Episode]:
                eps = await self.originals(task, step, limit, counters, report.rollout, report.first_call)
                report.group(QuestionGroup(task.task_id, tuple(e.rollout for e in eps)))
                return eps

            per_question = await asyncio.gather(*(question(t) for t in tasks))
            episodes["originals"] = [e for q in per_question for e in q]
            return [QuestionGroup(t.task_id, tuple(e.rollout for e in eps)) for t, eps in zip(tasks, per_question)]

        async def resample(plan: ResamplePlan) -> list[Rollout]:  # phase 3: K token-exact continuations per prefix
            return await resample_jobs(plan.jobs)

        drawn_episodes: dict[str, Episode] = {}

        async def resample_jobs(jobs: Sequence[ResampleJob]) -> list[Rollout]:
            drawn = await self.continuations(jobs, {t.task_id: t for t in tasks}, step, limit, counters)
            drawn_episodes.update((e.rollout.rollout_id, e) for e in drawn)
            return [e.rollout for e in drawn]

        def on_phase(name: str) -> None:
            cache[name] = self._cache_counters()

        if cfg.axpo.enable and cfg.axpo.streaming != "off":
            outcome = await run_axpo_step_streaming(ids, streamed, resample_jobs, cfg.axpo, cfg.n, step, on_phase)
        else:
            outcome = await run_axpo_step(rollouts, resample, cfg.axpo, step, on_phase)
        # The step's continuations only: a speculative start the plan did not take may have finished
        # before it was cancelled; its episodes are not part of the step.
        originals, continuations = episodes["originals"], [drawn_episodes[c.rollout_id] for c in outcome.continuations]
        metrics = dict(outcome.diagnostics)
        metrics.update(self.episode_metrics(originals, continuations, outcome.plan, counters))
        metrics.update({f"workflow/{name}": value for name, value in outcome.seconds.items()})
        metrics.update(_cache_metrics(cache["start"], cache["plan"], cache["resample"]))
        stats = {e.rollout.rollout_id: e.stats for e in list(originals) + list(continuations)}
        return StepResult(step, outcome.groups, outcome.plan, outcome.continuations, outcome.rows, metrics, stats)

    # -- the phases' building blocks (also used by the rllm adapter, one question per run) -------

    async def originals(self, task: Task, step: int, limit: asyncio.Semaphore, counters: Counter,
                        on_rollout: Callable[[Rollout], None] | None = None,
                        on_first_call: Callable[[str, str, float | None], None] | None = None) -> list[Episode]:
        """Phase 1 for one question: its N episodes, concurrently; ids ``<task_id>#<i>``. For the
        streaming planner: ``on_rollout`` gets each graded rollout as it finishes, ``on_first_call``
        ``(question_id, rollout_id, c_s)`` each rollout's first tool call as its turn ends."""

        async def one(i: int) -> Episode:
            episode = await self.original(task, i, step, limit, counters, on_first_call)
            if on_rollout is not None:
                on_rollout(episode.rollout)
            return episode

        return list(await asyncio.gather(*(one(i) for i in range(self.config.n))))

    async def original(self, task: Task, index: int, step: int, limit: asyncio.Semaphore, counters: Counter,
                       on_first_call: Callable[[str, str, float | None], None] | None = None) -> Episode:
        """Episode ``index`` of phase 1 alone (id ``<task_id>#<index>``, the same seed as in :meth:`originals`),
        so an evaluation can run, cache and resume samples one by one."""
        seed = derive_seed(self.config.seed, step, task.task_id, index)
        return await self._episode(task, f"{task.task_id}#{index}", task.task_id, seed, None, limit, counters, on_first_call)

    async def continuations(
        self, jobs: Sequence[ResampleJob], tasks: dict[str, Task], step: int, limit: asyncio.Semaphore, counters: Counter
    ) -> list[Episode]:
        """Phase 3: K episodes per job, all issued together; ids ``<source_id>~c<k>``."""
        cfg = self.config
        return list(await asyncio.gather(*(
            self._episode(
                tasks[job.question_id], f"{job.source_id}~c{k}", job.question_id,
                derive_seed(cfg.seed, step, job.source_id, "cont", k), job, limit, counters,
            )
            for job in jobs
            for k in range(job.k)
        )))

    # -- one episode, with retries and a timeout ------------------------------------------------

    async def _episode(
        self, task: Task, rollout_id: str, question_id: str, seed: int, job: ResampleJob | None,
        limit: asyncio.Semaphore, counters: Counter, on_first_call: Callable[[str, str, float | None], None] | None = None,
    ) -> Episode:
        cfg = self.config
        reported: list[float] = []

        def first_call(c: float) -> None:
            reported.append(c)
            on_first_call(question_id, rollout_id, c)

        spent = 0  # engine retries of failed attempts: counted with the episode that is kept
        async with limit:
            for attempt in range(cfg.rollout_retries + 1):
                episode = await self._attempt(task, rollout_id, question_id, derive_seed(seed, attempt), job,
                                              first_call if on_first_call is not None else None)
                episode.stats.engine_retries += spent
                if episode.rollout.termination is not Termination.ERROR:
                    return episode
                spent = episode.stats.engine_retries
                counters[f"failure/{episode.rollout.error.split(':', 1)[0]}"] += 1
                if reported:  # the planner may rely on this rollout's call: a retry would be another rollout
                    counters["retries_skipped_after_call"] += 1
                    break
                if attempt < cfg.rollout_retries:
                    counters["rollout_retries"] += 1
            counters["failed_rollouts"] += 1
            return episode

    async def _attempt(self, task: Task, rollout_id: str, question_id: str, seed: int, job: ResampleJob | None,
                       on_first_call: Callable[[float], None] | None = None) -> Episode:
        env = None
        try:
            env = self.env_factory()
            env.reset(task)
            state = self.agent.new_state(task, env, job)
        except Exception as exc:  # noqa: BLE001 - an env that cannot start is a recorded failure
            return _failed(task, rollout_id, question_id, job, f"EnvError: {type(exc).__name__}: {exc}", self.chat)
        try:
            run = self.agent.run(env, task, rollout_id=rollout_id, question_id=question_id, seed=seed, job=job, state=state,
                                 on_first_call=on_first_call)
            if self.config.rollout_timeout_s is None:
                return await run
            return await asyncio.wait_for(run, self.config.rollout_timeout_s)
        except asyncio.TimeoutError:
            rollout = self.agent.record(
                state, rollout_id, question_id, Termination.ERROR, 0.0, False, job,
                f"Timeout: episode exceeded {self.config.rollout_timeout_s:g}s",
            )
            return Episode(rollout, state.stats)
        finally:
            close = getattr(env, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001 - closing shared tools is the owner's business
                    pass

    # -- metrics ---------------------------------------------------------------------------------

    def _cache_counters(self) -> tuple[int, int] | None:
        fn = getattr(self.engine, "prefix_cache_stats", None)
        return fn() if callable(fn) else None

    def episode_metrics(self, originals: Sequence[Episode], conts: Sequence[Episode], plan: ResamplePlan, counters: Counter) -> dict[str, float]:
        def total(episodes, attr):
            return float(sum(getattr(e.stats, attr) for e in episodes))

        everyone = list(originals) + list(conts)
        gen1, gen3 = total(originals, "generated_tokens"), total(conts, "generated_tokens")
        out = {
            "workflow/rollouts_phase1": float(len(originals)),
            "workflow/rollouts_phase3": float(len(conts)),
            "workflow/generated_tokens_phase1": gen1,
            "workflow/generated_tokens_phase3": gen3,
            "workflow/extra_token_ratio": gen3 / gen1 if gen1 else float("nan"),
            "workflow/requests": total(everyone, "requests"),
            "workflow/tool_calls": total(everyone, "tool_calls"),
            "workflow/tool_errors": total(everyone, "tool_errors"),
            "workflow/malformed_calls": total(everyone, "malformed_calls"),
            "workflow/engine_retries": total(everyone, "engine_retries"),
            "workflow/rollout_retries": float(counters.get("rollout_retries", 0)),
            "workflow/retries_skipped_after_call": float(counters.get("retries_skipped_after_call", 0)),
            "workflow/failed_rollouts": float(counters.get("failed_rollouts", 0)),
            "workflow/extra_samples_exact": float(len(conts) == plan.used),
        }
        # The python sandbox's layer: calls per layer (every layer named, so each step has the keys)
        # and those with a private uid; a step whose calls all ran at bwrap with a private uid has
        # sandbox_calls/bwrap == sandbox_calls/private_uid == its sandboxed calls.
        sandbox = sum((e.stats.sandbox_calls for e in everyone), Counter())
        for key in (*ISOLATION_LEVELS, "private_uid", *sorted(set(sandbox) - {*ISOLATION_LEVELS, "private_uid"})):
            out[f"workflow/sandbox_calls/{key}"] = float(sandbox.get(key, 0))
        for key, value in counters.items():
            if key.startswith("failure/"):
                out[f"workflow/{key}"] = float(value)
        for term in Termination:
            out[f"workflow/termination/{term.value}"] = float(sum(e.rollout.termination is term for e in everyone))
        prompt3, cached3 = total(conts, "first_prompt_tokens"), total(conts, "first_cached_tokens")
        if prompt3:
            # How much of prompt + prefix the engine served from its cache, read from each
            # continuation's first request (vLLM's per-request ``num_cached_tokens`` over the expanded
            # prompt); valid when phase 3 overlaps phase 1 (streaming), where the engine-wide counters
            # below mix both. Later turns add new observation tokens, which no cache can hold.
            out["workflow/continuation_prefix_cache_hit_rate"] = cached3 / prompt3
        return out


def _cache_metrics(before, mid, after) -> dict[str, float]:
    """vLLM's own prefix-cache counters, split by phase (hits / queries, in tokens)."""
    if before is None or mid is None or after is None:
        return {}
    out = {}
    for name, (a, b) in (("phase1", (before, mid)), ("phase3", (mid, after))):
        hits, queries = b[0] - a[0], b[1] - a[1]
        out[f"workflow/prefix_cache_hits_{name}"] = float(hits)
        out[f"workflow/prefix_cache_queries_{name}"] = float(queries)
        out[f"workflow/prefix_cache_hit_rate_{name}"] = hits / queries if queries else float("nan")
    return out


def _failed(task: Task, rollout_id: str, question_id: str, job: ResampleJob | None, error: str, chat: ChatFormat) -> Episode:
    """A rollout that never started: the prompt (or the job's prefix) and no new tokens."""
    if job is not None:
        rollout = Rollout(
            rollout_id=rollout_id, question_id=question_id, prompt_ids=job.prompt_ids, response_ids=job.prefix_ids,
            response_mask=job.prefix_mask, response_logprobs=job.prefix_logprobs, tool_calls=(), reward=0.0,
            correct=False, termination=Termination.ERROR, turns=0, images=job.images,
            image_offsets=tuple([-1] * len(task.images)) + tuple(
                i for i, t in enumerate(job.prefix_ids) if t == chat.image_pad_id
            ),
            kind=RolloutKind.CONTINUATION, source_id=job.source_id, prefix_len=job.prefix_len, error=error,
        )
    else:
        rollout = Rollout(
            rollout_id=rollout_id, question_id=question_id, prompt_ids=np.zeros(0, dtype=np.int64), response_ids=[],
            response_mask=[], response_logprobs=[], tool_calls=(), reward=0.0, correct=False,
            termination=Termination.ERROR, turns=0, error=error,
        )
    return Episode(rollout, EpisodeStats())

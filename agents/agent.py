"""The multi-turn tool-using agent: token-exact episodes as the core's :class:`~axpo_rllm.core.records.Rollout`.

One episode, turn by turn::

    prompt  = chat template(system, tools block from the env's schemas, user turn with the task's images)
    turn t  = engine(prompt + response so far) -> model tokens (mask 1, their raw logprobs), run to
              end-of-turn (EOS) or the token budget — never stopped at a ``</tool_call>`` text, so a
              call drafted inside the reasoning does not end the turn
    parse   -> answer (verify, stop) | the turn's calls, in order (valid ones run together; a
              malformed one is answered with its error) (agents/parsing.py)
    obs     = the observation turn rendered through the chat template and appended as tokens
              ("<|im_end|>\\n<|im_start|>user\\n<tool_response>…</tool_response><|im_end|>\\n<|im_start|>assistant\\n",
              one ``<tool_response>`` per call, one unexpanded image pad per returned image, tool
              text as plain text; mask 0, logprob 0)

The context budget (``max_context_tokens``) counts every image as the tokens its pad expands to
(the processor's own resize rule), task images and tool images alike.

Why tokens, never text: the model's own ids are kept across turns (re-tokenising its text can give
other ids), so a continuation request can send exactly ``prompt + prefix`` (docs/algorithm.md §2).

At the turn cap (``max_turns``, default 3) the ``cap_policy`` decides: ``force_answer`` makes the
last turn an answer turn (a hint in the observation, ``<tool_call>`` banned; termination
``max_turns``), ``mask`` lets the last turn run free and marks a rollout that still calls a tool
``over_turn`` (reward 0, masked from the loss as in Mini-o3).

Terminations: ``answer``; ``max_turns`` (the forced last turn answered); ``over_turn``;
``max_tokens`` (an answer turn cut by the token limit is still graded: the verifier decides whether
it holds an answer; a budget exhausted before a turn or an observation could fit is reward 0);
``error`` (engine failure after ``engine_retries``, or an env failure; the reason is recorded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.parsing import (
    CALL_CLOSE,
    CALL_OPEN,
    THINK_CLOSE,
    ParsedCall,
    TurnKind,
    locate_calls,
    parse_turn_text,
)
from axpo_rllm.core.planner import mean_probability
from axpo_rllm.core.records import ResampleJob, Rollout, RolloutKind, Task, Termination, ToolCallSpan
from axpo_rllm.engines.base import BackendContractError, EngineError, GenerationRequest, GenerationResult, RolloutEngine

__all__ = ["AgentConfig", "ChatFormat", "EpisodeStats", "Episode", "Agent", "derive_seed"]
# ChatFormat lives in chat_format; re-exported here because the agent is where callers meet it.

CapPolicy = Literal["force_answer", "mask"]


@dataclass(frozen=True)
class AgentConfig:
    max_turns: int = 3
    """Assistant turns per episode (docs/algorithm.md 'Setting': ≤ 3)."""
    cap_policy: CapPolicy = "force_answer"
    """``force_answer``: the last turn must answer; ``mask``: a call in the last turn makes the rollout over-turn."""
    max_tokens_per_turn: int = 512
    max_response_tokens: int = 2048
    """Budget of the whole response (model and observation tokens)."""
    max_context_tokens: int = 8192
    """Prompt + response must fit (the engine's max_model_len, counting one token per image pad)."""
    temperature: float = 1.0
    top_p: float = 1.0
    system_prompt: str | None = "You are a helpful assistant."
    final_turn_hint: str = "This is your last turn: give the final answer now, without calling a tool."
    engine_retries: int = 2
    """Retries of one failed generation request before the rollout is recorded as an error."""
    request_timeout_s: float | None = 600.0
    """One generation request still unanswered after this many seconds is a failed request
    (``EngineError``, retried like any other): a request a server lost must not hold its step
    until the episode's timeout. ``None``: wait as long as the episode may."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"AgentConfig.max_turns must be >= 1, got {self.max_turns}")
        if self.cap_policy not in ("force_answer", "mask"):
            raise ValueError(f"AgentConfig.cap_policy must be force_answer|mask, got {self.cap_policy!r}")
        if self.max_tokens_per_turn < 1 or self.max_response_tokens < 1:
            raise ValueError("AgentConfig token limits must be >= 1")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"AgentConfig.request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}")


def derive_seed(*parts: Any) -> int:
    """A stable 62-bit seed from any parts (same parts, same seed, in every process)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class EpisodeStats:
    """Counters of one episode (summed into the step's metrics by the workflow)."""

    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    """Prompt tokens sent, each image counted as the tokens its pad expands to (as the engine counts)."""
    cached_tokens: int = 0
    """Prefix-cache tokens the engine reported (expanded count; 0 when it cannot tell)."""
    first_prompt_tokens: int = 0
    """The episode's first request: its prompt tokens (for a continuation: prompt + prefix), counted
    only when the engine reported a cached count for it (else 0, like ``first_cached_tokens``)."""
    first_cached_tokens: int = 0
    """The episode's first request: prompt tokens the engine served from its prefix cache."""
    malformed_calls: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    sandbox_calls: Counter = field(default_factory=Counter)
    """Calls of sandboxed tools by the isolation layer their results report (``metadata["isolation"]``),
    and under ``"private_uid"`` those that ran under a uid of their own."""
    engine_retries: int = 0
    wall_s: float = 0.0


@dataclass
class Episode:
    rollout: Rollout
    stats: EpisodeStats


@dataclass
class _State:
    """The growing record of one episode (kept outside the coroutine so a timeout can still record it)."""

    prompt_ids: np.ndarray
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    calls: list[ToolCallSpan] = field(default_factory=list)
    turns: int = 0
    answer_start: int = -1
    stats: EpisodeStats = field(default_factory=EpisodeStats)


class Agent:
    """Runs episodes of one env against one engine. Stateless between episodes (safe to share)."""

    def __init__(self, engine: RolloutEngine, chat: ChatFormat, config: AgentConfig = AgentConfig()) -> None:
        self.engine = engine
        self.chat = chat
        self.config = config

    # -- public ---------------------------------------------------------------------------------

    def new_state(self, task: Task, env, job: ResampleJob | None = None) -> _State:
        if job is None:
            prompt = np.asarray(self.chat.prompt_ids(task, env.tool_schemas(), self.config.system_prompt), dtype=np.int64)
            return _State(prompt_ids=prompt, images=list(task.images), offsets=[-1] * len(task.images))
        state = _State(prompt_ids=job.prompt_ids, images=list(job.images))
        state.ids = [int(t) for t in job.prefix_ids]
        state.mask = [int(m) for m in job.prefix_mask]
        state.logprobs = [float(x) for x in job.prefix_logprobs]
        pads = [i for i, t in enumerate(state.ids) if t == self.chat.image_pad_id]
        state.offsets = [-1] * (len(job.images) - len(pads)) + pads
        if len(job.images) != len(task.images) + len(pads):
            raise ValueError(
                f"job {job.job_id}: {len(job.images)} images but the task has {len(task.images)} and the prefix "
                f"{len(pads)} image pads"
            )
        if len(job.images) != len(task.images):
            # The env only knows the task's images; replaying earlier tool outputs into it is not supported.
            raise NotImplementedError(f"job {job.job_id}: a prefix that holds tool-returned images cannot be resumed")
        return state

    async def run(
        self,
        env,
        task: Task,
        *,
        rollout_id: str,
        question_id: str,
        seed: int,
        job: ResampleJob | None = None,
        state: _State | None = None,
        on_first_call: Callable[[float], None] | None = None,
    ) -> Episode:
        """One episode (``job`` given: a continuation of the job's prefix). Never raises for engine,
        tool or env failures: they end the rollout with ``Termination.ERROR`` and the reason. A
        :class:`~axpo_rllm.engines.base.BackendContractError` (e.g. no log-probs) propagates: every
        request would fail the same way, so the step must stop.

        ``on_first_call(c)``: called once, as soon as the turn holding the rollout's first tool call
        has ended, with that call's c_s (AXPO's confidence, as the finished rollout will score it);
        the streaming planner uses it while the rollout still runs."""
        started = time.perf_counter()
        env.reset(task)
        if state is None:
            state = self.new_state(task, env, job)
        try:
            termination, reward, correct = await self._loop(env, task, state, rollout_id, seed, job, on_first_call)
            error = ""
        except BackendContractError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded with its reason, never dropped
            termination, reward, correct = Termination.ERROR, 0.0, False
            error = f"{type(exc).__name__}: {exc}"
        state.stats.wall_s = time.perf_counter() - started
        return Episode(self.record(state, rollout_id, question_id, termination, reward, correct, job, error), state.stats)

    def record(
        self,
        state: _State,
        rollout_id: str,
        question_id: str,
        termination: Termination,
        reward: float,
        correct: bool,
        job: ResampleJob | None,
        error: str = "",
    ) -> Rollout:
        n = len(state.mask)  # a failure mid-append can leave ids one ahead: keep the consistent part
        cont = job is not None
        return Rollout(
            rollout_id=rollout_id,
            question_id=question_id,
            prompt_ids=state.prompt_ids,
            response_ids=state.ids[:n],
            response_mask=state.mask[:n],
            response_logprobs=state.logprobs[:n],
            tool_calls=tuple(c for c in state.calls if c.end <= n),
            reward=float(reward),
            correct=bool(correct),
            termination=termination,
            turns=state.turns,
            images=tuple(im for im, o in zip(state.images, state.offsets) if o < n),
            image_offsets=tuple(o for o in state.offsets if o < n),
            answer_start=state.answer_start if state.answer_start <= n else -1,
            kind=RolloutKind.CONTINUATION if cont else RolloutKind.ORIGINAL,
            source_id=job.source_id if cont else "",
            prefix_len=job.prefix_len if cont else 0,
            error=error,
        )

    # -- the turn loop --------------------------------------------------------------------------

    def _start(self, state: _State, job: ResampleJob | None) -> tuple[int, int]:
        """``(turn index, index where that turn starts)``: a continuation resumes its prefix's turn."""
        if job is None or job.prefix_len == 0:
            return 0, 0
        obs = [i for i, m in enumerate(state.mask) if m == 0]
        return max(job.turns_used - 1, 0), (obs[-1] + 1 if obs else 0)

    async def _loop(self, env, task: Task, state: _State, rollout_id: str, seed: int, job: ResampleJob | None,
                    on_first_call: Callable[[float], None] | None = None):
        cfg, chat = self.config, self.chat
        tool_names = set(env.tool_names)
        turn, turn_start = self._start(state, job)
        state.turns = turn + 1 if turn_start > 0 or (job is not None and job.prefix_len > 0) else turn  # a resumed turn is open
        while True:
            forced = cfg.cap_policy == "force_answer" and turn == cfg.max_turns - 1
            context = self._context_tokens(state)  # the request's prompt, images expanded
            budget = min(cfg.max_tokens_per_turn, cfg.max_response_tokens - len(state.ids), cfg.max_context_tokens - context)
            if budget < 1:
                return Termination.MAX_TOKENS, 0.0, False
            banned = None
            if forced:
                banned = tuple(t for t in (chat.image_pad_id, chat.video_pad_id, chat.call_open_id) if t is not None)
            request = GenerationRequest(
                prompt_ids=tuple(int(t) for t in state.prompt_ids) + tuple(state.ids),
                images=tuple(state.images),
                max_tokens=budget,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=derive_seed(seed, turn, len(state.ids)),
                banned_token_ids=banned,
                request_id=f"{rollout_id}/t{turn}",
            )  # the turn runs to end-of-turn (EOS) or its token budget, never to a `</tool_call>` text
            result = await self._generate(request, state.stats, context)
            state.turns = turn + 1
            state.ids.extend(result.token_ids)
            state.logprobs.extend(result.logprobs)
            state.mask.extend([1] * len(result.token_ids))
            turn_ids = state.ids[turn_start:]
            text = chat.decode(turn_ids)
            parsed = parse_turn_text(text, tool_names, think_open=chat.think_open)
            if forced or parsed.kind is TurnKind.ANSWER:
                state.answer_start = turn_start + chat.answer_offset(turn_ids)
                answer = parsed.answer if parsed.kind is TurnKind.ANSWER else text.split(THINK_CLOSE, 1)[-1].strip()
                verdict = await env.afinish(answer)
                if forced and turn > 0:
                    termination = Termination.MAX_TURNS
                elif result.finish_reason == "length":
                    termination = Termination.MAX_TOKENS
                else:
                    termination = Termination.ANSWER
                return termination, float(verdict.reward), bool(verdict.correct)

            calls = self._record_calls(state, parsed, turn_ids, turn_start, turn)
            if on_first_call is not None and state.calls:
                first = state.calls[0]
                on_first_call(mean_probability(state.logprobs[first.body_start:first.end]))  # = planner.confidence
                on_first_call = None
            if turn == cfg.max_turns - 1:  # mask policy: a call in the last turn (Mini-o3 over-turn)
                return Termination.OVER_TURN, 0.0, False
            responses = await self._answer_calls(env, calls, state.stats)
            hint = cfg.final_turn_hint if (cfg.cap_policy == "force_answer" and turn + 1 == cfg.max_turns - 1) else None
            obs_ids = chat.observation_ids([(t, len(ims)) for t, ims in responses], state.ids[-1] if state.ids else None, hint)
            obs_images = [im for _, ims in responses for im in ims]
            grown = len(obs_ids) + sum(chat.image_tokens(im) - 1 for im in obs_images)
            if len(state.ids) + len(obs_ids) >= cfg.max_response_tokens or self._context_tokens(state) + grown >= cfg.max_context_tokens:
                return Termination.MAX_TOKENS, 0.0, False
            base = len(state.ids)
            state.offsets.extend(base + i for i, t in enumerate(obs_ids) if t == chat.image_pad_id)
            state.images.extend(obs_images)
            state.ids.extend(obs_ids)
            state.logprobs.extend([0.0] * len(obs_ids))
            state.mask.extend([0] * len(obs_ids))
            turn += 1
            turn_start = len(state.ids)

    def _context_tokens(self, state: _State) -> int:
        """The context as the model sees it: every image pad counted as the tokens it expands to."""
        images = sum(self.chat.image_tokens(im) - 1 for im in state.images)
        return len(state.prompt_ids) + len(state.ids) + images

    def _record_calls(self, state: _State, parsed, turn_ids: Sequence[int], turn_start: int, turn: int) -> list[ParsedCall]:
        """Every call of the turn as a :class:`ToolCallSpan` of the rollout (valid or not, in order);
        returns the calls, a call whose opener is not the ``<tool_call>`` token made malformed."""
        chat = self.chat
        spans = locate_calls(turn_ids, parsed.calls, open_id=chat.call_open_id, close_id=chat.call_close_id, decode=chat.decode)
        calls = []
        for call, span in zip(parsed.calls, spans):
            if span is None:  # the text names a call the ids do not hold: not executable as recorded
                calls.append(call if call.error else dataclasses.replace(call, error=f"write the call as {CALL_OPEN}{{json}}{CALL_CLOSE}"))
                continue
            if span.end > span.body:
                state.calls.append(ToolCallSpan(turn_start + span.open, turn_start + span.body, turn_start + span.end,
                                                turn=turn, name=call.name, valid=call.valid))
            calls.append(call)
        return calls

    async def _answer_calls(self, env, calls: Sequence[ParsedCall], stats: EpisodeStats) -> list[tuple[str, tuple]]:
        """One ``(text, images)`` per call, in call order: the env runs the valid ones together; a
        malformed one is answered with its error."""
        valid = [c for c in calls if c.valid]
        observations = iter(await env.acall_tools([(c.name, c.arguments) for c in valid]) if valid else ())
        out = []
        for call in calls:
            if not call.valid:
                stats.malformed_calls += 1
                out.append((f"Error: {call.error}", ()))
                continue
            obs = next(observations)
            stats.tool_calls += 1
            stats.tool_errors += int(obs.is_error)
            meta = getattr(obs, "metadata", None) or {}
            if meta.get("isolation"):
                stats.sandbox_calls[str(meta["isolation"])] += 1
                stats.sandbox_calls["private_uid"] += int(bool(meta.get("private_uid")))
            out.append((obs.model_text, tuple(obs.images)))
        return out

    async def _request(self, request: GenerationRequest) -> GenerationResult:
        """One request to the engine under ``request_timeout_s`` (a timeout is an ``EngineError``)."""
        timeout = self.config.request_timeout_s
        if timeout is None:
            return await self.engine.generate(request)
        try:
            return await asyncio.wait_for(self.engine.generate(request), timeout)
        except asyncio.TimeoutError:
            raise EngineError(f"no answer within request_timeout_s={timeout:g}s", request.request_id) from None

    async def _generate(self, request: GenerationRequest, stats: EpisodeStats, prompt_tokens: int) -> GenerationResult:
        """``prompt_tokens``: the request's prompt as the engine counts it (images expanded)."""
        attempt = 0
        while True:
            try:
                result = await self._request(request)
            except EngineError:
                if attempt >= self.config.engine_retries:
                    raise
                attempt += 1
                stats.engine_retries += 1
                await asyncio.sleep(0)
                continue
            stats.requests += 1
            stats.generated_tokens += len(result.token_ids)
            stats.prompt_tokens += prompt_tokens
            stats.cached_tokens += max(result.num_cached_tokens, 0)
            if stats.requests == 1 and result.num_cached_tokens >= 0:
                stats.first_prompt_tokens, stats.first_cached_tokens = prompt_tokens, result.num_cached_tokens
            if result.finish_reason in ("abort", "error"):
                raise EngineError(f"generation ended with finish_reason={result.finish_reason!r}", request.request_id)
            return result

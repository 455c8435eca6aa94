"""Test and benchmark harness: a rollout engine biased towards tool calls.

Why: a tiny random model almost never writes ``<tool_call>``, so AXPO would never trigger in an
end-to-end test. :class:`ToolBiasedEngine` wraps a real engine and, on a seeded fraction of
requests, *inserts* tool-call tokens into what the model generates: either only the opener
``<tool_call>`` (the model writes the call's content itself) or a whole well-formed call. Every
other token is the wrapped model's own sample, and every inserted token carries its true raw
logprob under the model (teacher-forced with ``engine.score``), so the rollout records stay
token-exact and the continuation checks stay real. Only the sampling distribution of the inserted
tokens is not the policy's: never use this for training.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Sequence

from axpo_rllm.engines.base import GenerationRequest, GenerationResult, RolloutEngine

__all__ = ["ToolBiasedEngine"]


class ToolBiasedEngine(RolloutEngine):
    """Wraps ``inner``; fresh assistant turns get a tool call inserted after ``after_tokens`` tokens.

    ``open_rate``: share of fresh turns that get ``<tool_call>`` inserted (the model continues);
    ``call_rate``: share that get the whole ``call_ids`` (``<tool_call>…</tool_call>``) inserted;
    ``body_rate``: share of requests that *end* with ``<tool_call>`` (AXPO continuations) whose
    call content is inserted (``call_ids[1:]``), so continuations sometimes run a real tool.
    The draw is seeded by the request's seed: the same request is biased the same way.
    """

    def __init__(
        self,
        inner: RolloutEngine,
        *,
        turn_start_ids: Sequence[int],
        call_ids: Sequence[int],
        open_rate: float = 0.5,
        call_rate: float = 0.25,
        body_rate: float = 0.0,
        after_tokens: int = 4,
        open_id: int | None = None,
        score_inserted: bool = True,
    ) -> None:
        self.inner = inner
        self.turn_start_ids = tuple(turn_start_ids)
        self.call_ids = tuple(call_ids)
        self.open_id = self.call_ids[0] if open_id is None else int(open_id)
        """``<tool_call>``; pass it when ``call_ids`` starts with something else (e.g. ``</think>``
        for a chat format whose turns start inside the reasoning)."""
        self.open_rate, self.call_rate, self.body_rate = open_rate, call_rate, body_rate
        self.after_tokens = after_tokens
        self.score_inserted = score_inserted
        """False (benchmarks): inserted tokens get seeded synthetic logprobs instead of a scoring
        request, so the harness adds no engine work of its own (a scoring request is a full
        prefill with prompt logprobs, which a real policy's call never costs)."""
        self.inserted = 0

    def __getattr__(self, name: str) -> Any:  # prefix_cache_stats, tokenizer ... of the wrapped engine
        return getattr(self.inner, name)

    async def score(self, prompt_ids, images, continuation_ids) -> list[float]:
        return await self.inner.score(prompt_ids, images, continuation_ids)

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        banned = request.banned_token_ids or ()
        if self.open_id in banned:
            return await self.inner.generate(request)
        draw = random.Random(request.seed if request.seed is not None else 0).random()
        ids = request.prompt_ids
        if ids[-len(self.turn_start_ids):] == self.turn_start_ids:
            if draw < self.call_rate and request.max_tokens > self.after_tokens + len(self.call_ids):
                return await self._insert(request, self.call_ids, self.after_tokens, resume=False)
            if self.call_rate <= draw < self.call_rate + self.open_rate and request.max_tokens > self.after_tokens + 1:
                return await self._insert(request, (self.open_id,), self.after_tokens, resume=True)
        elif ids and ids[-1] == self.open_id and draw < self.body_rate and request.max_tokens > len(self.call_ids):
            return await self._insert(request, self.call_ids[1:], 0, resume=False)
        return await self.inner.generate(request)

    async def _insert(self, request: GenerationRequest, inserted: Sequence[int], after: int, resume: bool) -> GenerationResult:
        tokens: list[int] = []
        logprobs: list[float] = []
        cached = -1
        if after:
            head = await self.inner.generate(dataclasses.replace(request, max_tokens=after, stop=()))
            cached = head.num_cached_tokens
            if head.finish_reason != "length":  # the model ended its turn first: nothing to insert
                return head
            tokens += head.token_ids
            logprobs += head.logprobs
        context = list(request.prompt_ids) + tokens
        if self.score_inserted:
            logprobs += await self.inner.score(context, request.images, list(inserted))
        else:
            rng = random.Random(f"inserted/{request.seed}/{len(context)}")
            logprobs += [math.log(rng.uniform(0.05, 1.0)) for _ in inserted]
        tokens += inserted
        self.inserted += 1
        finish, stop_reason = "stop", None
        if resume:
            tail = await self.inner.generate(
                dataclasses.replace(
                    request,
                    prompt_ids=tuple(context) + tuple(inserted),
                    max_tokens=request.max_tokens - len(tokens),
                    seed=None if request.seed is None else request.seed + 1,
                )
            )
            tokens += tail.token_ids
            logprobs += tail.logprobs
            finish, stop_reason = tail.finish_reason, tail.stop_reason
        return GenerationResult(
            token_ids=tokens, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason,
            num_cached_tokens=cached, request_id=request.request_id,
        )

    def close(self) -> None:
        self.inner.close()

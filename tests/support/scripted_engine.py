"""A rollout engine that answers from a script (tests only): exact expected scores without a trained model.

``reply(prompt_text, request) -> text`` decides each turn from the decoded context; the text is
tokenised with the model's tokenizer (so the agent parses real token ids) and cut like a real
engine would: at ``</tool_call>`` when that is a stop string (kept), else closed with
``<|im_end|>``. Every token gets logprob -1. ``interrupt_after``: raise ``KeyboardInterrupt``
from the request after that many requests (an eval killed by Ctrl-C).
"""

from __future__ import annotations

from typing import Callable, Sequence

from axpo_rllm.engines.base import GenerationRequest, GenerationResult, RolloutEngine

__all__ = ["ScriptedEngine", "Interrupting"]


class ScriptedEngine(RolloutEngine):
    def __init__(self, tokenizer, reply: Callable[[str, GenerationRequest], str]) -> None:
        self.tokenizer = tokenizer
        self.reply = reply
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.requests = 0

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for request in requests:
            self.requests += 1
            text = self.reply(self.tokenizer.decode(list(request.prompt_ids)), request)
            stop = next((s for s in request.stop if s in text), None)
            if stop is not None:
                text = text[: text.index(stop) + len(stop)]
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            if stop is None:
                ids.append(self.end_id)
            finish = "stop"
            if len(ids) > request.max_tokens:
                ids, finish = ids[: request.max_tokens], "length"
            out.append(GenerationResult(tuple(ids), tuple([-1.0] * len(ids)), finish, stop, -1, request.request_id))
        return out

    async def score(self, prompt_ids, images, continuation_ids) -> list[float]:
        return [-1.0] * len(continuation_ids)


class Interrupting(RolloutEngine):
    """Wraps an engine; the request after ``after`` served ones raises KeyboardInterrupt (Ctrl-C mid-eval)."""

    def __init__(self, inner: RolloutEngine, after: int) -> None:
        self.inner, self.after, self.served = inner, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.served >= self.after:
            raise KeyboardInterrupt
        self.served += 1
        return await self.inner.generate(request)

    async def generate_many(self, requests):
        return [await self.generate(r) for r in requests]

    async def score(self, prompt_ids, images, continuation_ids):
        return await self.inner.score(prompt_ids, images, continuation_ids)

    def close(self) -> None:
        self.inner.close()

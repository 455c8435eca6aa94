"""A rollout engine that answers from a script (tests only): exact expected scores without a trained model.

``reply(prompt_text, request) -> text`` decides each turn from the decoded context; the text is
tokenised with the model's tokenizer (so the agent parses real token ids) and cut like a real
engine would: at ``</tool_call>`` when that is a stop string (kept), else closed with
``<|im_end|>``. Every token gets logprob -1. ``interrupt_after``: raise ``KeyboardInterrupt``
from the request after that many requests (an eval killed by Ctrl-C).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from axpo_rllm.engines.base import GenerationRequest, GenerationResult, RolloutEngine

__all__ = ["ScriptedEngine", "Interrupting", "suite_reply"]


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
    """Wraps an engine; the request after ``after`` served ones raises KeyboardInterrupt (Ctrl-C mid-eval).

    Once only, as a real Ctrl-C: requests made while asyncio cancels the rest are cancelled, not
    interrupted again (a second interrupt would abort that clean-up and leave tasks pending).
    """

    def __init__(self, inner: RolloutEngine, after: int) -> None:
        self.inner, self.after, self.served, self.interrupted = inner, after, 0, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.interrupted:
            raise asyncio.CancelledError
        if self.served >= self.after:
            self.interrupted = True
            raise KeyboardInterrupt
        self.served += 1
        return await self.inner.generate(request)

    async def generate_many(self, requests):
        return [await self.generate(r) for r in requests]

    async def score(self, prompt_ids, images, continuation_ids):
        return await self.inner.score(prompt_ids, images, continuation_ids)

    def close(self) -> None:
        self.inner.close()


CROP = '<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>'
BROKEN = '<tool_call>\n{"name": "crop", "arguments": </tool_call>'


def suite_reply(prompt: str, request) -> str:
    """The script for the generated three-benchmark suite (tests/data/conftest.py).

    V*: always A. MathVision choice rows: a crop call, then B. Its math row: 4 on even seeds, 5
    otherwise. fvqa: a malformed call, then Paris.
    """
    if "color of the box" in prompt:
        return "<think>red</think>\\boxed{A}"
    if "Options:" in prompt:
        return "\\boxed{B}" if "<tool_response>" in prompt else "<think>zoom in</think>" + CROP
    if "How many sides" in prompt:
        return "\\boxed{4}" if request.seed % 2 == 0 else "\\boxed{5}"
    return "\\boxed{Paris}" if "Error:" in prompt else BROKEN

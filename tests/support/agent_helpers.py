"""Helpers shared by the agent/workflow tests (imported by conftest.py and the tests; not a package)."""

from __future__ import annotations

import asyncio

CALL_TEXT = '<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>'


def noise_image(seed: int, width: int = 84, height: int = 56):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def make_tasks(b: int, with_images: bool = True):
    from axpo_rllm.core.records import Task

    return [
        Task(f"q{i}", f"Which color is the square in picture {i}? Answer A or B.", "A", "choice",
             images=(noise_image(i),) if with_images else (), metadata={"choices": {"A": "red", "B": "blue"}})
        for i in range(b)
    ]


class AlwaysWrongGrader:
    """A verifier override for tests: every answer is wrong (counts its calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def grade_task(self, task, response):
        from axpo_rllm.envs.verifiers import VerifyResult

        self.calls += 1
        return VerifyResult(reward=0.0, correct=False, extracted=None)


class RecordingEngine:
    """Wraps an engine and keeps every request it served (to check token-exact prompts)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.requests = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request):
        self.requests.append(request)
        return await self.inner.generate(request)

    async def generate_many(self, requests):
        self.requests.extend(requests)
        return await self.inner.generate_many(requests)

    async def score(self, *args):
        return await self.inner.score(*args)


def biased(engine, chat, **kw):
    from tool_biased_engine import ToolBiasedEngine

    return ToolBiasedEngine(engine, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=chat.encode(CALL_TEXT), **kw)


HANG = "hang"
"""A scripted item: the request never gets an answer (a server that lost it)."""


class ScriptedEngine:
    """Answers each request with the next scripted item: token ids (logprob -0.5 each), an
    exception, or :data:`HANG` (never answers)."""

    def __init__(self, script) -> None:
        self.script = list(script)
        self.requests = []

    async def generate(self, request):
        from axpo_rllm.engines.base import GenerationResult

        self.requests.append(request)
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item == HANG:
            await asyncio.Event().wait()
        return GenerationResult(token_ids=item, logprobs=[-0.5] * len(item), finish_reason="stop", request_id=request.request_id)

    async def generate_many(self, requests):
        return [await self.generate(r) for r in requests]

    async def score(self, prompt_ids, images, continuation_ids):
        return [-0.5] * len(continuation_ids)


class FakeEngine:
    """A fast, seeded stand-in for a model (workflow logic tests): pseudo-random word tokens, a
    ``</think>`` early in half the turns, EOS at a random length; honours stop strings via ids."""

    def __init__(self, chat, words, fail_ids=()) -> None:
        self.chat = chat
        self.words = list(words)
        self.fail_ids = set(fail_ids)
        self.requests = []

    async def generate(self, request):
        import random

        from axpo_rllm.engines.base import EngineError, GenerationResult

        self.requests.append(request)
        if any(f in request.request_id for f in self.fail_ids):
            raise EngineError("scripted failure", request.request_id)
        rng = random.Random(request.seed)
        n = rng.randint(3, request.max_tokens + 2)
        ids = [rng.choice(self.words) for _ in range(min(n, request.max_tokens))]
        if rng.random() < 0.5 and len(ids) > 3:
            ids[2] = self.chat.think_close_id
        finish = "length"
        if n <= request.max_tokens:
            ids[-1] = min(self.chat.eos_ids)
            finish = "stop"
        return GenerationResult(token_ids=ids, logprobs=[-1.0 - rng.random() for _ in ids], finish_reason=finish,
                                num_cached_tokens=0, request_id=request.request_id)

    async def generate_many(self, requests):
        return [await self.generate(r) for r in requests]

    async def score(self, prompt_ids, images, continuation_ids):
        return [-0.25] * len(continuation_ids)


class DelayedEngine:
    """Wraps an engine; each request first waits ``delay(request_id)`` seconds and its start and end
    times are kept (``spans[request_id] = (start, end)``, ``time.perf_counter``)."""

    def __init__(self, inner, delay) -> None:
        self.inner = inner
        self.delay = delay
        self.spans = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request):
        import asyncio
        import time

        start = time.perf_counter()
        await asyncio.sleep(self.delay(request.request_id))
        result = await self.inner.generate(request)
        self.spans[request.request_id] = (start, time.perf_counter())
        return result

    async def generate_many(self, requests):
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def score(self, *args):
        return await self.inner.score(*args)

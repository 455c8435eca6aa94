"""Benchmark and test harness: a step whose rollouts show the paper's symptoms on a random tiny model.

A random tiny Qwen-VL neither calls tools nor ends its turns: on its own every turn runs to the
token budget and no question would ever trigger AXPO. Two seeded, documented wrappers give the
step the shape of an RL step at the paper's rates instead (docs/algorithm.md: ~30% tool use, ~40% all-wrong
tool subgroups), with every token still the real engine's work:

- :class:`LengthShapedEngine` caps each request's tokens at a length drawn from a long-tailed
  (log-normal) distribution, seeded by the request's seed: turns end at varied lengths, so rollouts
  finish at varied times and phase 1 has the tail a real policy's lengths give it.
- :class:`SymptomGrader` grades each final answer correct with probability ``accuracy``, drawn from
  a hash of (question, answer text): deterministic, so two arms that sample the same tokens get the
  same grades, and not every answer is wrong.

Tool use comes from ``tool_biased_engine.ToolBiasedEngine`` (a share of fresh turns gets a whole,
well-formed call inserted, its tokens carrying their true logprobs). Never train on any of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from typing import Any, Sequence

from axpo_rllm.engines.base import GenerationRequest, GenerationResult, RolloutEngine

__all__ = ["LengthShapedEngine", "SymptomGrader"]


class LengthShapedEngine(RolloutEngine):
    """Wraps ``inner``; each request's ``max_tokens`` becomes ``min(max_tokens, L)``, L drawn from
    log-normal(median ``median_tokens``, ``sigma``) with the request's seed, at least ``min_tokens``."""

    def __init__(self, inner: RolloutEngine, *, median_tokens: float = 24.0, sigma: float = 0.8, min_tokens: int = 4) -> None:
        if median_tokens <= 0 or sigma < 0 or min_tokens < 1:
            raise ValueError(f"bad length shape: median {median_tokens}, sigma {sigma}, min {min_tokens}")
        self.inner = inner
        self.median_tokens, self.sigma, self.min_tokens = median_tokens, sigma, min_tokens

    def __getattr__(self, name: str) -> Any:  # prefix_cache_stats, llm, reset_prefix_cache ... of the wrapped engine
        return getattr(self.inner, name)

    def length(self, request: GenerationRequest) -> int:
        rng = random.Random(f"length/{request.seed}/{len(request.prompt_ids)}")
        return max(self.min_tokens, int(round(self.median_tokens * math.exp(self.sigma * rng.gauss(0.0, 1.0)))))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.inner.generate(dataclasses.replace(request, max_tokens=min(request.max_tokens, self.length(request))))

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def score(self, prompt_ids, images, continuation_ids) -> list[float]:
        return await self.inner.score(prompt_ids, images, continuation_ids)

    def close(self) -> None:
        self.inner.close()


class SymptomGrader:
    """Correct with probability ``accuracy`` per answer, seeded by (question id, answer text)."""

    def __init__(self, accuracy: float = 0.3) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        self.accuracy = accuracy

    def grade_task(self, task, response: str):
        from axpo_rllm.envs.verifiers import VerifyResult

        digest = hashlib.sha256(f"{task.task_id}\x00{response}".encode()).digest()
        correct = int.from_bytes(digest[:8], "big") / 2**64 < self.accuracy
        return VerifyResult(reward=float(correct), correct=correct)

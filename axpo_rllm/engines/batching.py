"""Batched execution for an in-process engine: concurrent ``generate`` calls gathered into one
backend call on one worker thread (:class:`BatchingExecutor`), and :class:`InProcessEngine`, the
engine base class that runs its model that way (transformers; vLLM adds :mod:`.stepping`)."""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .contract import (
    BackendContractError,
    EngineError,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    check_image_pads,
    engine_error,
)

__all__ = ["BatchingExecutor", "InProcessEngine"]


class InProcessEngine(RolloutEngine):
    """An engine whose model lives in this process (transformers, offline vLLM).

    Concurrent ``generate`` calls are gathered into one backend batch on one worker thread, and
    scoring runs on that same thread, so the model is never touched from two threads at once.
    Subclasses call :meth:`_start_batching` once the model is loaded and implement
    :meth:`_run_batch` and :meth:`_score_sync`; :meth:`_release` frees backend state on close.
    """

    def _start_batching(self, name: str) -> None:
        self._executor = BatchingExecutor(self._run_batch, name=name, validate=self._validate)
        self._closed = False

    def _validate(self, request: GenerationRequest) -> None:
        """Raise :class:`EngineError` for a request the backend would reject (checked per request
        before batching, so it fails alone). Default: one unexpanded image pad per image."""
        check_image_pads(request, self.image_pad_id)

    @abc.abstractmethod
    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate a batch on the worker thread."""

    @abc.abstractmethod
    def _score_sync(self, prompt_ids: list[int], images: list[Any], continuation_ids: list[int]) -> list[float]:
        """Teacher-forced logprobs, on the worker thread."""

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self._check_open()
        return await self._executor.submit_many(list(requests))

    async def score(self, prompt_ids: Sequence[int], images: Sequence[Any], continuation_ids: Sequence[int]) -> list[float]:
        self._check_open()
        return await self._executor.run(self._score_sync, list(prompt_ids), list(images), list(continuation_ids))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown()
        self._release()

    def _release(self) -> None:
        """Free what the backend holds beyond the worker thread (nothing by default)."""

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future = field(repr=False)


class BatchingExecutor:
    """Collects the requests of concurrent ``generate`` calls into one backend call.

    Why: an agent issues K continuations as K concurrent ``generate`` calls (rllm style); vLLM is
    only fast when they reach it as one batch. Requests submitted while a batch runs form the next
    batch. The backend runs on one worker thread (an in-process vLLM is not thread-safe) so the
    event loop stays free.

    Failures stay with the request that caused them: ``validate`` (when given) checks each request
    before it joins a batch, and a batch the backend rejects is split in halves and retried until
    the failing requests are alone (a backend that is down fails every request, each with its error).
    """

    def __init__(
        self,
        run_batch: Callable[[list[GenerationRequest]], list[GenerationResult]],
        name: str,
        validate: Callable[[GenerationRequest], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._validate = validate
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Task | None = None

    async def submit_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        loop = asyncio.get_running_loop()
        items = [_Pending(r, loop.create_future()) for r in requests]
        self._pending.extend(items)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # let every coroutine started in this tick enqueue first
        while self._pending:
            batch, self._pending = self._pending, []
            await self._run_isolated(self._admit(batch))

    def _admit(self, batch: list[_Pending]) -> list[_Pending]:
        """The requests that pass ``validate``; the others fail alone, now."""
        if self._validate is None:
            return batch
        admitted = []
        for p in batch:
            try:
                self._validate(p.request)
            except Exception as exc:  # noqa: BLE001 - the request's own error, for its waiter only
                _fail(p, exc)
                continue
            admitted.append(p)
        return admitted

    async def _run_isolated(self, batch: list[_Pending]) -> None:
        """Run ``batch``; if the backend rejects it, bisect so that only failing requests fail."""
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._thread, self._run_batch, [p.request for p in batch])
            if len(results) != len(batch):
                raise BackendContractError(f"the backend returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - every waiter must learn of its failure
            if len(batch) == 1 or isinstance(exc, BackendContractError):
                for p in batch:
                    _fail(p, exc)
                return
            half = len(batch) // 2
            await self._run_isolated(batch[:half])
            await self._run_isolated(batch[half:])
            return
        for p, result in zip(batch, results):
            if not p.future.done():
                p.future.set_result(result)

    def run_sync(self, fn: Callable, *args):
        """Run ``fn`` on the backend thread and wait (for scoring and shutdown)."""
        return self._thread.submit(fn, *args).result()

    async def run(self, fn: Callable, *args):
        """Run ``fn`` on the backend thread without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)


def _fail(pending: _Pending, exc: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(engine_error(exc, pending.request.request_id))

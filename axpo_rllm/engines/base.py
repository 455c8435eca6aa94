"""The one token-in/token-out interface every rollout engine implements.

Why token-in/token-out: AXPO resamples continuations from a prefix of a rollout, so the engine
must accept exactly the token ids a previous call returned (plus the same images) and produce
the logprobs the trainer will compare against. Text round trips re-tokenise and break that.

Prompt convention (docs/upstream.md §1b): ``prompt_ids`` hold **one unexpanded** ``<|image_pad|>``
per image, as the chat template renders it; each engine expands pads to the vision tower's token
count itself. Logprobs are **raw** (the model's distribution before temperature, top-p and bans:
vLLM's default ``raw_logprobs``), one per generated token.

Engines are adapters at the edge: the algorithm consumes :class:`GenerationResult` and never
imports a concrete engine.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

__all__ = [
    "EngineError",
    "BackendContractError",
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "InProcessEngine",
    "checked_result",
    "BatchingExecutor",
    "SteppingBackend",
    "SteppingExecutor",
    "check_image_pads",
]

FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineError(RuntimeError):
    """A generation could not be produced; the workflow records it as an ``error`` rollout.

    ``request_id`` names the failed request (empty when the failure was not request-specific).
    """

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(f"[request {request_id}] {message}" if request_id else message)
        self.request_id = request_id


class BackendContractError(RuntimeError):
    """The backend broke the token-in/token-out contract for a request that was well formed:
    no log-probs, ids and log-probs of different lengths, an unknown finish reason.

    Not an :class:`EngineError`: retrying cannot help (every request would fail the same way, e.g.
    a server asked for log-probs in a form it reads as "none"), so the agent and the workflow let it
    propagate and the step stops with this message instead of training on failed rollouts.
    """

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(f"[request {request_id}] {message}" if request_id else message)
        self.request_id = request_id


@dataclass(frozen=True)
class GenerationRequest:
    """One sampling call (filled by the agent)."""

    prompt_ids: tuple[int, ...]
    """The full context so far, with one unexpanded ``<|image_pad|>`` per image."""
    images: tuple[Any, ...] = ()
    """``PIL.Image.Image`` objects, one per image pad in ``prompt_ids``, in order."""
    max_tokens: int = 256
    temperature: float = 1.0
    """0 means greedy decoding; at most 2 (vLLM's and OpenAI's bound, enforced for every engine)."""
    top_p: float = 1.0
    seed: int | None = None
    """Per-request seed: the same request with the same seed gives the same tokens, whatever else
    is in the batch. None draws a fresh seed."""
    stop: tuple[str, ...] = ()
    """Stop strings; the token that completes one is kept in ``token_ids`` (vLLM's behaviour)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop ids on top of the model's EOS ids; the stop token is kept in ``token_ids``."""
    banned_token_ids: tuple[int, ...] | None = None
    """Ids never sampled. None means the engine default: the image and video pad ids (a random
    model emits them, which breaks the next turn's image count; docs/upstream.md §2)."""
    request_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.banned_token_ids is not None:
            object.__setattr__(self, "banned_token_ids", tuple(int(t) for t in self.banned_token_ids))
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_ids is empty")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}")
        if not (0 <= self.temperature <= 2):
            raise ValueError(f"request {self.request_id!r}: temperature must be in [0, 2], got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"request {self.request_id!r}: top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError(f"request {self.request_id!r}: stop strings must be non-empty, got {self.stop!r}")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced (filled by the engine)."""

    token_ids: tuple[int, ...]
    """The generated ids, the stop token included."""
    logprobs: tuple[float, ...]
    """Raw logprob of each generated id under the model (same length as ``token_ids``)."""
    finish_reason: str
    """``stop`` (EOS, a stop id or a stop string), ``length`` (max_tokens), ``abort`` or ``error``."""
    stop_reason: int | str | None = None
    """The stop string or stop id that ended it; None for EOS or ``length``."""
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache (expanded count); -1 when the engine cannot tell."""
    request_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        object.__setattr__(self, "logprobs", tuple(float(x) for x in self.logprobs))
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"request {self.request_id!r}: {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


def checked_result(request: GenerationRequest, token_ids: Sequence[int], logprobs: Sequence[float] | None,
                   finish_reason: str, backend: str, **fields: Any) -> "GenerationResult":
    """A :class:`GenerationResult`, or :class:`BackendContractError` naming ``backend`` when it
    returned no log-probs (or not one per token) or an unknown finish reason."""
    if logprobs is None or len(logprobs) != len(token_ids):
        got = "none" if logprobs is None else f"{len(logprobs)}"
        raise BackendContractError(
            f"{backend} returned {len(token_ids)} token ids but {got} log-probs; the trainer needs the "
            "sampled token's log-prob for every generated token (check how the backend reads the "
            "request's log-prob setting)",
            request.request_id,
        )
    if finish_reason not in FINISH_REASONS:
        raise BackendContractError(f"{backend} returned finish_reason={finish_reason!r}; expected one of {FINISH_REASONS}",
                                   request.request_id)
    return GenerationResult(token_ids=token_ids, logprobs=logprobs, finish_reason=finish_reason,
                            request_id=request.request_id, **fields)


def check_image_pads(request: GenerationRequest, image_pad_id: int) -> None:
    """Raise :class:`EngineError` unless ``prompt_ids`` hold exactly one pad per image, none adjacent.

    vLLM accepts mismatches silently and wrongly (docs/upstream.md §1b), so every engine checks first.
    """
    ids = request.prompt_ids
    n_pads = sum(1 for t in ids if t == image_pad_id)
    if n_pads != len(request.images):
        raise EngineError(
            f"prompt_ids hold {n_pads} image pad(s) (id {image_pad_id}) but {len(request.images)} image(s) "
            "were given; expected one unexpanded pad per image",
            request.request_id,
        )
    if any(a == b == image_pad_id for a, b in zip(ids, ids[1:])):
        raise EngineError(
            "prompt_ids hold an expanded run of image pads; pass one unexpanded pad per image", request.request_id
        )


class RolloutEngine(abc.ABC):
    """Token-in/token-out generation with per-token logprobs.

    Subclasses implement :meth:`generate_many` (one batched call) and :meth:`score`; concurrent
    :meth:`generate` calls are funnelled into batches by :class:`BatchingExecutor` where the
    backend batches (vLLM) or simply awaited one by one.
    """

    @abc.abstractmethod
    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request; results in request order. Raises :class:`EngineError`."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one request (concurrent calls may be batched by the engine)."""
        return (await self.generate_many([request]))[0]

    @abc.abstractmethod
    async def score(
        self, prompt_ids: Sequence[int], images: Sequence[Any], continuation_ids: Sequence[int]
    ) -> list[float]:
        """Teacher-forced raw logprobs of ``continuation_ids`` after ``prompt_ids`` (+ images)."""

    def close(self) -> None:
        """Release the backend (threads, model, HTTP client). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        pending.future.set_exception(_engine_error(exc, pending.request.request_id))


def _engine_error(exc: BaseException, request_id: str) -> BaseException:
    """What a waiter gets: our own errors as they are, anything else as an :class:`EngineError`."""
    if isinstance(exc, (EngineError, BackendContractError)):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}", request_id)


class SteppingBackend(Protocol):
    """What :class:`SteppingExecutor` drives: an engine that advances every running request by one
    step at a time and accepts new requests between steps (vLLM's ``LLMEngine``). Every method is
    called on the executor's one worker thread."""

    def add(self, work: Any) -> Hashable:
        """Start ``work`` (a request); returns its key. Raising fails this work alone."""

    def step(self) -> list[tuple[Hashable, Any]]:
        """Advance every running request once; returns ``(key, output)`` of those that finished."""

    def abort(self, keys: Sequence[Hashable]) -> None:
        """Stop running requests (their waiters are gone)."""

    def has_unfinished(self) -> bool:
        """Whether any request is running."""


@dataclass
class _Work:
    payload: Any
    convert: Callable[[Any], Any]
    future: asyncio.Future = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    request_id: str = ""
    key: Hashable | None = None


class SteppingExecutor:
    """Continuous batching for an in-process engine: a request joins the running batch at the
    engine's next step, instead of waiting for the whole batch before it to finish.

    Why (issue 14): with one ``llm.generate(batch)`` per batch (:class:`BatchingExecutor`), a
    request submitted while a batch runs waits for that batch's longest member, so an agent's next
    turn, or an AXPO continuation released during phase 1, queues behind the phase's tail. Serving
    engines (vLLM's server, verl's async rollout) schedule per step; this gives the in-process
    engine the same timing. The backend lives on one worker thread (an in-process vLLM is not
    thread-safe) that loops: admit new work, abort cancelled work, ``step()``, hand finished
    outputs back to their event loops; it sleeps while nothing runs.

    Failures stay with their work: ``backend.add`` rejects a request alone; a result
    ``convert`` cannot read fails that request alone; a failing ``step()`` fails (and aborts) every
    request then running, each with an :class:`EngineError` naming the step's error. A waiter that is
    cancelled (its episode was cancelled) has its request aborted in the backend.
    """

    def __init__(self, backend: SteppingBackend, name: str) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self._incoming: list[_Work] = []
        self._cancelled: list[_Work] = []
        self._calls: list[tuple[Callable, tuple, concurrent.futures.Future]] = []
        self._live: dict[Hashable, _Work] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, payload: Any, convert: Callable[[Any], Any], request_id: str = "") -> Any:
        """Run one piece of work; ``convert(output)`` (on the worker thread) makes its result;
        ``request_id`` names it in errors."""
        loop = asyncio.get_running_loop()
        work = _Work(payload, convert, loop.create_future(), loop, request_id)
        work.future.add_done_callback(lambda f: self._on_done(work))
        with self._cond:
            if self._closed:
                raise EngineError("the engine is closed")
            self._incoming.append(work)
            self._cond.notify()
        return await work.future

    def call(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the worker thread between two steps and wait (counters, shutdown work)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineError("the engine is closed")
            self._calls.append((fn, args, done))
            self._cond.notify()
        return done.result()

    def running(self) -> int:
        """Requests in the backend now (admitted, not finished)."""
        return len(self._live)

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    # -- the worker thread ---------------------------------------------------------------------

    def _on_done(self, work: _Work) -> None:
        if work.future.cancelled():
            with self._cond:
                self._cancelled.append(work)
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._cancelled or self._calls or self._closed or self._live):
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                cancelled, self._cancelled = self._cancelled, []
                calls, self._calls = self._calls, []
                closed = self._closed
            for fn, args, done in calls:
                try:
                    done.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - the caller gets it
                    done.set_exception(exc)
            if closed:
                self._fail_all(list(incoming) + list(self._live.values()), EngineError("the engine was closed"))
                return
            self._abort([w for w in cancelled if w.key is not None and self._live.get(w.key) is w])
            for work in incoming:
                self._admit(work)
            if self._live:
                self._step()

    def _admit(self, work: _Work) -> None:
        if work.future.done():  # cancelled before it got here
            return
        try:
            work.key = self._backend.add(work.payload)
        except Exception as exc:  # noqa: BLE001 - this request's own error
            self._resolve(work, exc)
            return
        self._live[work.key] = work

    def _abort(self, works: Sequence[_Work]) -> None:
        if not works:
            return
        for work in works:
            self._live.pop(work.key, None)
        try:
            self._backend.abort([w.key for w in works])
        except Exception:  # noqa: BLE001 - the waiters are gone; nothing to tell
            pass

    def _step(self) -> None:
        try:
            finished = self._backend.step()
        except Exception as exc:  # noqa: BLE001 - every running request must learn of it
            works = list(self._live.values())
            self._abort(works)
            self._fail_all(works, EngineError(f"engine step failed with {len(works)} request(s) running: "
                                              f"{type(exc).__name__}: {exc}"))
            return
        for key, output in finished:
            work = self._live.pop(key, None)
            if work is None:
                continue  # aborted while it ran
            try:
                result = work.convert(output)
            except Exception as exc:  # noqa: BLE001 - a malformed result fails its request alone
                result = exc
            self._resolve(work, result)
        if self._live and not self._backend.has_unfinished():  # never spin on work the backend lost
            works = list(self._live.values())
            self._fail_all(works, EngineError(f"the engine finished {len(works)} request(s) without returning them"))

    def _fail_all(self, works: Sequence[_Work], exc: Exception) -> None:
        for work in works:
            self._resolve(work, exc)
        self._live.clear()

    @staticmethod
    def _resolve(work: _Work, outcome: Any) -> None:
        def settle() -> None:
            if work.future.done():
                return
            if isinstance(outcome, BaseException):
                work.future.set_exception(_engine_error(outcome, work.request_id))
            else:
                work.future.set_result(outcome)

        try:
            work.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the waiter's loop is closed: nobody is waiting
            pass

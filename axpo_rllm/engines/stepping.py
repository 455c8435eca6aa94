"""Continuous batching for an in-process engine (:class:`SteppingExecutor`): a request joins the
running batch at the backend's next step (vLLM's ``LLMEngine``), on one worker thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

from .contract import EngineError, engine_error

__all__ = ["SteppingBackend", "SteppingExecutor"]


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
                work.future.set_exception(engine_error(outcome, work.request_id))
            else:
                work.future.set_result(outcome)

        try:
            work.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the waiter's loop is closed: nobody is waiting
            pass

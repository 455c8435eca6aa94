"""Deadline-bounded grading: checks that can hang (sympy) run in worker processes that are
killed when they overrun (a thread stuck in sympy cannot be stopped)."""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
from typing import Any, Callable


class GraderTimeout(Exception):
    pass


class GraderCrash(Exception):
    pass


def _write_frame(stream, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise EOFError("grader worker closed its pipe")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_raw_frame(stream) -> bytes:
    (length,) = struct.unpack(">I", _read_exact(stream, 4))
    return _read_exact(stream, length)


def _read_frame(stream) -> Any:
    return pickle.loads(_read_raw_frame(stream))


def _serve(warmup: tuple[str, ...]) -> None:
    """Worker main loop (runs in the child): import heavy modules once, then answer ``(fn, args)`` frames.

    The child talks over its stdin/stdout pipes; fd 1 is pointed at stderr first so that a stray
    ``print`` in a verifier cannot corrupt the protocol.
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    for module in warmup:
        try:
            importlib.import_module(module)
        except Exception:  # a missing optional module shows up as a crash of the job that needs it
            pass
    _write_frame(out, "ready")
    while True:
        try:
            raw = _read_raw_frame(inp)
        except EOFError:
            return
        try:
            job = pickle.loads(raw)
            if job is None:
                return
            fn, args = job
            reply = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - everything (an unloadable job too) goes back as a crash
            reply = (False, f"{type(e).__name__}: {e}")
        _write_frame(out, reply)


class _Worker:
    """One grader subprocess.

    A plain ``subprocess`` rather than ``multiprocessing``: spawn/forkserver re-import the
    parent's ``__main__`` (a training script without a main guard would run again), and fork is
    unsafe in a process that runs threads (rllm's env executor, Ray).
    """

    def __init__(self, warmup: tuple[str, ...], startup_timeout_s: float) -> None:
        code = (
            "import sys; sys.path[:0] = " + repr([p for p in sys.path if p]) + "; "
            "from axpo_rllm.envs.verifiers.deadline import _serve; _serve(" + repr(tuple(warmup)) + ")"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        try:
            ready = self._receive(startup_timeout_s)
        except (GraderTimeout, EOFError) as e:
            self.kill()
            raise GraderCrash(f"grader worker did not start within {startup_timeout_s:g}s ({e})") from None
        if ready != "ready":
            self.kill()
            raise GraderCrash(f"grader worker sent {ready!r} instead of 'ready'")

    def _receive(self, timeout_s: float) -> Any:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not readable:
            raise GraderTimeout(f"no verdict within {timeout_s:g}s")
        return _read_frame(self.process.stdout)

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        _write_frame(self.process.stdin, (fn, args))
        ok, value = self._receive(timeout_s)
        if not ok:
            raise GraderCrash(value)
        return value

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self) -> None:
        try:
            _write_frame(self.process.stdin, None)
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class DeadlinePool:
    """Up to ``size`` warm worker processes; a job that overruns its deadline has its worker killed.

    Workers start on first use and import ``warmup`` modules before taking jobs, so the import time
    of sympy/math-verify never counts against a job's deadline.
    """

    def __init__(self, size: int = 2, warmup: tuple[str, ...] = ("math_verify",), startup_timeout_s: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"DeadlinePool size must be >= 1, got {size}")
        self._warmup = warmup
        self._startup_timeout_s = startup_timeout_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        """``fn(*args)`` in a worker; raises :class:`GraderTimeout` or :class:`GraderCrash`."""
        with self._slots:
            worker = self._take_worker()
            try:
                result = worker.run(fn, args, timeout_s)
            except GraderCrash:
                self._give_back(worker)  # the job raised; the worker itself is fine
                raise
            except GraderTimeout:
                worker.kill()
                raise
            except Exception as e:  # pipe broken, worker died, job not picklable: start afresh next time
                worker.kill()
                raise GraderCrash(f"grader worker failed ({type(e).__name__}: {e})") from None
            except BaseException:
                worker.kill()
                raise
            self._give_back(worker)
            return result

    def _take_worker(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise GraderCrash("DeadlinePool is closed")
            if self._idle:
                return self._idle.pop()
        return _Worker(self._warmup, self._startup_timeout_s)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


_default_pool: DeadlinePool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> DeadlinePool:
    """The process-wide pool (lazily created; sized for the grading load of one trainer process)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = DeadlinePool(size=max(1, min(4, (os.cpu_count() or 2) // 2)))
            atexit.register(_default_pool.close)
        return _default_pool

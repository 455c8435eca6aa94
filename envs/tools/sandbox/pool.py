"""The pool callers use: detects the layer, enforces the floor, and hands every call to the start
method's backend (:data:`BACKENDS`)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

from .backend import START_METHODS, SandboxBackend
from .floor import check_floor
from .fork import ForkBackend
from .probe import detect_isolation
from .results import SandboxLimits, SandboxResult
from .spawn import SpawnBackend

_log = logging.getLogger(__name__)
BACKENDS: dict[str, type[SandboxBackend]] = {"fork": ForkBackend, "spawn": SpawnBackend}
"""The backend of each start method (:data:`START_METHODS`)."""


class SandboxPool:
    """Isolated calls: ``start="fork"`` (default) forks each from one of ``size`` (default 1) warm
    template processes, ``start="spawn"`` keeps ``size`` (default 2) fresh interpreters started.
    :meth:`run` is thread-safe and blocking, :meth:`arun` its async form (never capped by asyncio's
    default thread pool)."""

    def __init__(self, limits: SandboxLimits | None = None, size: int | None = None, isolation: str = "auto",
                 start: str = "fork", min_isolation: str = "rlimits", private_uid: bool = False) -> None:
        """``min_isolation`` / ``private_uid``: the floor; below it the pool refuses to start
        (:class:`IsolationBelowFloor`) instead of running at what it found."""
        if start not in START_METHODS:
            raise ValueError(f"start={start!r}: expected one of {START_METHODS}")
        self.start = start
        self.limits = limits or SandboxLimits()
        self.isolation = detect_isolation(isolation, start)
        check_floor(self.isolation, min_isolation, private_uid)
        if self.isolation.level != "bwrap":
            _log.warning("python sandbox runs at the weaker %r layer (own uid: %s): %s",
                         self.isolation.level, self.isolation.own_uid, self.isolation.detail)
        backend = BACKENDS[start]
        self.size = max(1, int(size if size is not None else backend.default_size))
        self._closed = False
        self._tmp_root = tempfile.mkdtemp(prefix="axpo-sandbox-")
        os.chmod(self._tmp_root, 0o711)  # calls' uids may enter their own dir, never list others
        try:
            self._backend = backend(self.isolation, self.limits, self.size, self._tmp_root)
        except BaseException:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            raise
        atexit.register(self.close)  # templates / idle workers must not outlive an interpreter that forgot close()

    def run(self, code: str, images: Sequence[Any] = ()) -> SandboxResult:
        """Run ``code`` in a fresh sandboxed process; ``images`` are PIL images (``images`` in the code)."""
        return self._backend.run(code, images)

    async def arun(self, code: str, images: Sequence[Any] = ()) -> SandboxResult:
        return await self._backend.arun(code, images)

    def _standby_pids(self) -> list[int]:
        """Pids of the processes waiting for calls (templates, or ready spawned workers): the
        root of each one's process tree (its bwrap / unshare command when there is one)."""
        return self._backend.standby_pids()

    def close(self) -> None:
        """Stop serving and kill every template / idle worker (idempotent)."""
        atexit.unregister(self.close)
        if self._closed:
            return
        self._closed = True
        self._backend.close()
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""What a pool needs from a start method: run a call (blocking or on the event loop), name the
processes waiting for calls, and stop. :mod:`.fork` and :mod:`.spawn` implement it; the pool
(:mod:`.pool`) picks one by ``start`` and never branches on it again."""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
from typing import Any, Sequence

from .layers import Isolation
from .results import SandboxLimits, SandboxResult

START_METHODS = ("fork", "spawn")
"""``fork``: calls forked from a warm template process; ``spawn``: a fresh interpreter per call."""


class SandboxBackend(abc.ABC):
    """One start method's processes for one pool, started in the constructor (which raises
    :class:`~.results.SandboxUnavailable` when none starts)."""

    default_size: int
    """How many templates / ready workers a pool keeps when it is not told."""

    def __init__(self, isolation: Isolation, limits: SandboxLimits, size: int, tmp_root: str) -> None:
        self.isolation, self.limits, self.size, self.tmp_root = isolation, limits, size, tmp_root

    @abc.abstractmethod
    def run(self, code: str, images: Sequence[Any]) -> SandboxResult:
        """One call, blocking (any thread, a thread running an event loop included)."""

    @abc.abstractmethod
    async def arun(self, code: str, images: Sequence[Any]) -> SandboxResult:
        """One call that never blocks the running loop."""

    @abc.abstractmethod
    def standby_pids(self) -> list[int]:
        """The root of each process tree waiting for calls (its bwrap / unshare command if any)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving and kill every process waiting for calls (called once)."""


def run_sync(make_coroutine: Any) -> Any:
    """Run a coroutine to the end from blocking code (on a helper thread if this one runs a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coroutine())
    with concurrent.futures.ThreadPoolExecutor(1) as helper:
        return helper.submit(lambda: asyncio.run(make_coroutine())).result()

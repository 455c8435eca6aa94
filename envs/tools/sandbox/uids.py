"""The private uids of a trainer's calls (when it is root): one slot per call, handed out again
only after that call's processes are gone, and the sweep that ends what a uid left running."""

from __future__ import annotations

import collections
import os
import signal
import threading

from .results import SandboxUnavailable

UID_BASE, UID_SLOTS = 61000, 512


class UidSlots:
    """The private uids (61000 + slot) of one trainer process, each held by one call (or spawned
    worker) from before it starts until its processes are gone; handed out oldest-freed first.
    The last slot is the probe's. The first slot depends on the pid, so that two trainer processes
    on one node rarely use the same uid at the same time."""

    def __init__(self) -> None:
        first = os.getpid() * 61 % (UID_SLOTS - 1)
        self._free = collections.deque((first + i) % (UID_SLOTS - 1) for i in range(UID_SLOTS - 1))
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise SandboxUnavailable(f"all {UID_SLOTS - 1} private sandbox uids are held by running calls")
            return UID_BASE + self._free.popleft()

    def release(self, uid: int | None) -> None:
        if uid is not None and UID_BASE <= uid < UID_BASE + UID_SLOTS - 1:
            with self._lock:
                self._free.append(uid - UID_BASE)


SLOTS = UidSlots()
PROBE_UID = UID_BASE + UID_SLOTS - 1


def kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a worker's private uid), repeating while new ones appear."""
    for _ in range(20):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        if not found:
            return

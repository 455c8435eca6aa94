"""What a caller hands the sandbox and gets back: the per-call limits, the result of a call (the
limit that fired, in a fixed sentence) and the errors a pool raises when it cannot run calls."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

CPU_LIMIT, WALL_LIMIT = "cpu_time", "wall_clock"
"""Values of :attr:`SandboxResult.limit`."""


class SandboxUnavailable(RuntimeError):
    """No worker could be started (not even the ``rlimits`` layer)."""


class IsolationBelowFloor(SandboxUnavailable):
    """The strongest layer that works here is below the pool's floor (``min_isolation``,
    ``private_uid``): the sandbox refuses to start; the message names what is missing and the fix."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits; ``PythonCodeTool(**config)`` accepts each field by name."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 32
    workdir_mb: int = 256
    """Size of the tmpfs work dir (``bwrap``, and ``unshare`` under ``fork``; elsewhere ``file_size_mb`` caps each file)."""
    max_processes: int = 16
    max_open_files: int = 64
    max_output_chars: int = 4000
    """Per stream (stdout, stderr); the rest is cut and the cut is reported."""
    max_images: int = 4
    max_image_pixels: int = 1024 * 1024
    """Returned images above this are shrunk (aspect kept)."""
    max_decode_pixels: int = 16 * 1024 * 1024
    """Image files the code saves above this are not decoded at all (decompression bombs)."""
    python_guard: bool = True


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced; ``error`` is empty when the code finished without an exception."""

    stdout: str = ""
    stderr: str = ""
    images: tuple = ()
    error: str = ""
    timed_out: bool = False
    """The wall clock fired (``limit == "wall_clock"``)."""
    limit: str = ""
    """Which limit stopped the code: ``"cpu_time"``, ``"wall_clock"`` or ``""`` (none)."""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    isolation: str = ""
    metadata: dict = field(default_factory=dict)


def describe_end(status: dict | None) -> tuple[str, str]:
    """Why a call ended without answering (``status``: ``{"exit": n}`` / ``{"signal": n}``), and the
    name of the signal that ended it ('' if none)."""
    if not status:
        return "the sandbox worker closed its result channel without answering", ""
    if status.get("error"):
        return f"the sandbox could not start the call: {str(status['error'])[:300]}", ""
    signum = int(status.get("signal") or 0)
    try:
        name = signal.Signals(signum).name if signum else ""
    except ValueError:
        name = ""
    if name:
        return f"the sandbox worker was killed by {name}", name
    return f"the sandbox worker exited with status {status.get('exit')} without a result", ""


def finish_result(limits: SandboxLimits, level: str, start: float, error: str, limit: str, cpu_fired: bool,
                  images: list, notes: list, stdout: str, stderr: str) -> SandboxResult:
    """The result of a call: the limit that fired wins over any other error, in a fixed sentence."""
    if cpu_fired:
        limit = CPU_LIMIT
    if limit == CPU_LIMIT:
        error = f"CPU-time limit: the code used more than its {limits.cpu_s:g} s of CPU time and was stopped"
    elif limit == WALL_LIMIT:
        error = f"wall-clock limit: the code ran past its {limits.timeout_s:g} s time limit (wall clock); its process tree was killed"
    return SandboxResult(
        stdout=stdout, stderr=stderr, images=tuple(images), error=error, timed_out=limit == WALL_LIMIT,
        limit=limit, notes=tuple(notes), seconds=time.perf_counter() - start, isolation=level,
    )


def truncated(data: bytes, total: int, max_chars: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) > max_chars or total > len(data):
        text = text[:max_chars] + f"\n[... output truncated: {total} bytes in all]"
    return text

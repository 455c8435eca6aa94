"""Which isolation layer works here: a real call end to end through the start method's own
machinery, strongest layer first, cached per process."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Sequence

from .backend import START_METHODS
from .fork import ForkBackend
from .layers import ISOLATION_LEVELS, Isolation
from .results import SandboxLimits, SandboxUnavailable
from .spawn import Worker
from .uids import PROBE_UID

PROBE_CODE = (
    "import sys\nsys.modules.pop('colorsys', None)\nimport colorsys\n"
    "for name in ('PIL', 'numpy'):\n"
    "    if name in sys.modules:\n"
    "        open(sys.modules[name].__file__, 'rb').close()\n"
    "print(6 * 7)"
)
"""Prints 42 -- after importing a module afresh and reading PIL's (and numpy's) own file: under
``fork`` the interpreter is already loaded, so only a fresh read shows whether a call's uid can
read the Python installation and the venv's packages."""
BWRAP_MISSING = "bwrap is not installed"
UNSHARE_MISSING = "needs root and util-linux unshare"


def detect_isolation(prefer: str = "auto", start: str = "fork") -> Isolation:
    """The strongest layer that runs a real call end to end here with ``start`` (``prefer`` forces one).

    ``prefer="auto"`` reads the ``AXPO_SANDBOX_ISOLATION`` environment variable (a layer name or
    ``auto``). Order: bwrap > unshare > rlimits; at each, a private uid per call when the trainer is
    root and the Python installation is readable by another uid (at ``bwrap`` and ``unshare`` the
    trees are shown to it wherever they live; at ``rlimits`` a Python under ``/root`` is not
    reachable). The probe is a real call through the start method's own machinery (a template and
    a forked call for ``fork``). Cached per process and per ``bwrap`` / ``unshare`` found on
    ``PATH``: a probe costs one worker or template start (~0.2-0.5 s).
    """
    pinned = f"isolation={prefer!r}"
    if prefer == "auto":
        prefer = os.environ.get("AXPO_SANDBOX_ISOLATION", "auto")  # operators can pin a layer per node
        pinned = f"AXPO_SANDBOX_ISOLATION={prefer}"
    if prefer != "auto" and prefer not in ISOLATION_LEVELS:
        raise ValueError(f"isolation={prefer!r}: expected 'auto' or one of {ISOLATION_LEVELS}")
    if start not in START_METHODS:
        raise ValueError(f"start={start!r}: expected one of {START_METHODS}")
    found = (shutil.which("bwrap"), shutil.which("unshare"))
    return _detect(prefer, start, "" if prefer == "auto" else pinned, *found)


@functools.lru_cache(maxsize=None)
def _detect(prefer: str, start: str, pinned: str, *tools_found: str | None) -> Isolation:
    candidates = ISOLATION_LEVELS if prefer == "auto" else (prefer,)
    uid_options = (True, False) if os.geteuid() == 0 else (False,)
    failures: list[tuple[str, bool, str]] = []
    for level in candidates:
        for own_uid in uid_options:
            reason = _probe(level, own_uid, start)
            if reason is None:
                chosen = f"pinned by {pinned}" if pinned else "strongest layer available"
                detail = _describe_failures(failures) or chosen
                return Isolation(level, own_uid, detail, tuple(failures), pinned)
            failures.append((level, own_uid, reason))
    raise SandboxUnavailable(_describe_failures(failures))


def _describe_failures(failures: Sequence[tuple[str, bool, str]]) -> str:
    return "; ".join(f"{level}{' with a private uid' if own_uid else ''} unavailable: {reason}"
                     for level, own_uid, reason in failures)


def _probe(level: str, own_uid: bool, start: str = "fork") -> str | None:
    """None when ``level`` works with ``start``, else why not."""
    if level == "bwrap" and shutil.which("bwrap") is None:
        return BWRAP_MISSING
    if level == "unshare" and (shutil.which("unshare") is None or os.geteuid() != 0):
        return UNSHARE_MISSING
    tmp_root = tempfile.mkdtemp(prefix="axpo-sandbox-probe-")
    os.chmod(tmp_root, 0o711)
    limits = SandboxLimits(timeout_s=20)
    try:
        if start == "spawn":
            worker = Worker(level, limits, PROBE_UID if own_uid else None, tmp_root)
            try:
                worker.wait_ready(30)
                result = worker.run(PROBE_CODE, [])
            finally:
                worker.kill()
        else:
            backend = ForkBackend(Isolation(level, own_uid), limits, 1, tmp_root)
            try:
                result = backend.run(PROBE_CODE, [])
            finally:
                backend.close()
        if result.stdout.strip() != "42":
            return f"probe printed {result.stdout!r}, error {result.error!r}, stderr {result.stderr[-300:]!r}"
        return None
    except (OSError, SandboxUnavailable, TimeoutError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc)[-300:]}"
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def isolation_level(start: str = "fork") -> str:
    """The layer a default :class:`SandboxPool` (with ``start``) uses on this machine."""
    return detect_isolation("auto", start).level

"""The floor: the weakest isolation a pool accepts, and what a refusal names as missing (for each
stronger choice: bubblewrap, root, the path a private uid could not read) with its fix."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from .layers import ISOLATION_LEVELS, SYSTEM_TREES, Isolation, exposed_paths, inside, interpreter_files
from .probe import BWRAP_MISSING, UNSHARE_MISSING
from .results import IsolationBelowFloor

def _strength(level: str, own_uid: bool) -> tuple[int, bool]:
    return (len(ISOLATION_LEVELS) - ISOLATION_LEVELS.index(level), own_uid)


def meets_floor(level: str, own_uid: bool, min_isolation: str = "rlimits", private_uid: bool = False) -> bool:
    """Whether ``level`` (with or without a private uid per call) is at or above the floor."""
    return _strength(level, own_uid)[0] >= _strength(min_isolation, False)[0] and (own_uid or not private_uid)


def check_floor(isolation: Isolation, min_isolation: str = "rlimits", private_uid: bool = False) -> None:
    """:class:`IsolationBelowFloor` unless ``isolation`` meets the floor, naming what is missing
    for each stronger choice that would have met it, and the fix."""
    if min_isolation not in ISOLATION_LEVELS:
        raise ValueError(f"min_isolation={min_isolation!r}: expected one of {ISOLATION_LEVELS}")
    if meets_floor(isolation.level, isolation.own_uid, min_isolation, private_uid):
        return
    wanted = f"{min_isolation!r}{' with a private uid per call' if private_uid else ''}"
    missing = [_missing(level, own_uid, reason) for level, own_uid, reason in isolation.failures
               if meets_floor(level, own_uid, min_isolation, private_uid)]
    if private_uid and os.geteuid() != 0:
        missing.insert(0, f"root: a private uid per call needs the trainer to run as root (it runs as uid "
                          f"{os.geteuid()}); fix: run it as root")
    if isolation.pinned:
        missing.insert(0, f"the layer is pinned by {isolation.pinned}; fix: remove that setting")
    raise IsolationBelowFloor(
        f"the python sandbox refuses to start: the strongest isolation that works here is "
        f"{isolation.describe()}, below its floor min_isolation={wanted}. Missing: "
        + " | ".join(dict.fromkeys(missing) or ["(nothing stronger was tried)"])
        + ". Only where weaker isolation is acceptable: lower min_isolation (or set private_uid: false) "
        "in the python tool's config."
    )


BWRAP_INSTALL = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: dnf install bubblewrap)"


def _missing(level: str, own_uid: bool, reason: str) -> str:
    """One stronger choice that did not work: what it lacked and the fix."""
    if reason == BWRAP_MISSING:
        return f"bubblewrap: no `bwrap` on PATH={os.environ.get('PATH', '')}; fix: {BWRAP_INSTALL}"
    if reason == UNSHARE_MISSING:
        return "unshare: it needs root and util-linux's `unshare`; fix: run the trainer as root with util-linux"
    unreadable = _unreadable_path(level) if own_uid else None
    if unreadable:
        return (f"{level} with a private uid: that uid cannot read {unreadable}; fix: make it readable by other "
                f"users (chmod o+rX), or use a Python installation and venv whose files are"
                + ("" if level != "rlimits" else f", or {BWRAP_INSTALL} (it shows the trees to that uid)"))
    hint = ("; in a container bwrap needs user namespaces or root: allow them, or run the trainer as root"
            if level == "bwrap" else "")
    return f"{level}{' with a private uid' if own_uid else ''} did not start: {reason[:400]}{hint}"


def _unreadable_path(level: str) -> str | None:
    """The first file or directory of the Python installation a private uid cannot read at ``level``
    (mode and owner included), or None when none is found. At ``bwrap`` and ``unshare`` the
    directories above the exposed trees do not count: the sandbox makes its own way to them."""
    import sysconfig

    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}
    stdlib = sysconfig.get_paths(vars=base)
    targets = sorted(interpreter_files()) + [os.path.join(stdlib["stdlib"], "os.py"), stdlib["platstdlib"],
                                              sysconfig.get_paths()["purelib"]]
    for module in ("PIL", "numpy"):
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, "__file__", None):
            targets.append(loaded.__file__)
    exposed = exposed_paths() + SYSTEM_TREES
    for target in map(os.path.realpath, targets):
        top = next((root for root in exposed if inside(target, root)), "/") if level != "rlimits" else "/"
        chain = [str(p) for p in reversed(Path(target).parents) if inside(str(p), top)] + [target]
        for path in chain:
            try:
                mode = os.stat(path)
            except OSError:
                continue
            needed = stat.S_IXOTH if stat.S_ISDIR(mode.st_mode) and path != target else stat.S_IROTH
            if stat.S_ISDIR(mode.st_mode) and path == target:
                needed |= stat.S_IXOTH
            if not mode.st_mode & needed:
                return f"{path} (mode {stat.S_IMODE(mode.st_mode):04o}, owner uid {mode.st_uid})"
    return None

"""The isolation layers (``bwrap`` > ``unshare`` > ``rlimits``): the command that puts a worker
inside each, and the Python trees a call is shown wherever they live (the package's docstring
says what each layer holds off)."""

from __future__ import annotations

import functools
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .results import SandboxLimits

ISOLATION_LEVELS = ("bwrap", "unshare", "rlimits")
"""Strongest first."""
SANDBOX_WORKDIR = "/sandbox"
"""Where a call's work dir is mounted at ``bwrap`` (elsewhere: a directory under the pool's)."""


@dataclass(frozen=True)
class Isolation:
    """The sandbox layer in force and how it was chosen."""

    level: str
    own_uid: bool
    """True when each call runs under its own uid (trainer is root)."""
    detail: str = ""
    failures: tuple[tuple[str, bool, str], ...] = ()
    """``(layer, private uid, why not)`` of each stronger choice tried first."""
    pinned: str = ""
    """What fixed the layer instead of trying them all (``AXPO_SANDBOX_ISOLATION=...``,
    ``isolation=...``); empty under ``auto``."""

    def describe(self) -> str:
        """``"bwrap, a private uid per call"`` and the like: what a log line or report says."""
        if self.own_uid:
            return f"{self.level}, a private uid per call"
        if os.geteuid() == 0:
            return f"{self.level}, no private uid (calls run as root)"
        return f"{self.level}, no private uid (calls run as the trainer's uid {os.geteuid()})"


def python_roots() -> tuple[str, ...]:
    """Directories the worker's interpreter needs: installation, venv, and where PIL/numpy live."""
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots.add(os.path.realpath(os.path.dirname(os.path.dirname(sys.executable))))
    for module in ("PIL", "numpy"):
        try:
            spec = __import__("importlib.util").util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.origin:
            roots.add(os.path.realpath(os.path.dirname(os.path.dirname(spec.origin))))
    return _outermost(roots)


def _outermost(paths: Any) -> tuple[str, ...]:
    """``paths`` without those inside another one of them, shortest first."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(inside(path, k) for k in kept):
            kept.append(path)
    return tuple(kept)


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Shown read-only by bwrap as they are; at ``unshare`` and ``rlimits`` the host's own."""


def interpreter_files() -> set[str]:
    """Files the interpreter needs that may lie outside its trees: the real executable and the
    ``libpython`` it loaded (a build's absolute RUNPATH can point anywhere), each shown alone."""
    files = {os.path.realpath(sys.executable)}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libpython"):
                    files.add(os.path.realpath(fields[5].strip()))
    except OSError:
        pass
    return {f for f in files if os.path.isfile(f)}


@functools.lru_cache(maxsize=1)
def exposed_paths() -> tuple[str, ...]:
    """What a call sees of the Python installation beyond the system trees, read-only, at its own
    path: the interpreter's and the venv's trees, PIL's and numpy's, and the interpreter's files
    outside them. Nothing else of the directories above them. Computed once per process (a
    spawned worker per call would otherwise read ``/proc/self/maps`` each time)."""
    roots = python_roots()
    files = {f for f in interpreter_files() if not any(inside(f, r) for r in roots)}
    return tuple(p for p in _outermost(set(roots) | files) if not any(inside(p, s) for s in SYSTEM_TREES))


def _bwrap_command(workdir_mb: int) -> list[str]:
    # The bwrap the trainer's PATH finds (the one detection found), not the worker's PATH's.
    cmd = [
        shutil.which("bwrap") or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr",
    ]
    if os.geteuid() != 0:
        cmd.insert(1, "--unshare-user")  # unprivileged: bwrap needs a user namespace for the mounts
    for top in SYSTEM_TREES[1:]:
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(workdir_mb * 1024 * 1024), "--perms", "01777", "--tmpfs", SANDBOX_WORKDIR,
        # A /tmp to change into (a habit of model code), as at the other layers; nothing to write
        # there (the work dir is the one writable place): read-only and one page in size. Mounted
        # before the Python trees: a venv under /tmp is then bound into it, not hidden by it.
        "--size", "4096", "--perms", "0555", "--tmpfs", "/tmp",
    ]
    exposed = exposed_paths()
    # bwrap creates missing parents 0700; the worker's uid must traverse them. They are empty:
    # nothing else of a home or a checkout the trees live in is shown.
    parents = sorted({str(p) for path in exposed for p in Path(path).parents} - {"/", "/tmp"}, key=len)
    for parent in parents:
        cmd += ["--perms", "0755", "--dir", parent]
    for path in exposed:
        cmd += ["--ro-bind", path, path]
    cmd += ["--chdir", SANDBOX_WORKDIR, "--clearenv"]
    for key, value in worker_env(SANDBOX_WORKDIR).items():
        cmd += ["--setenv", key, value]
    return cmd


def _unshare_command() -> list[str]:
    # A shell as the namespace's PID 1 (not the worker): the kernel drops default-action signals
    # such as RLIMIT_CPU's SIGXCPU sent to a namespace init, and unshare turns a child's death by
    # signal into status 1; the shell passes the worker's 128 + N on.
    return [shutil.which("unshare") or "unshare", "--net", "--pid", "--ipc", "--uts", "--mount", "--fork",
            "--kill-child", "--mount-proc", "/bin/sh", "-c", '"$@"; exit $?', "sh"]


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that other users cannot enter (no ``o+x``), if any."""
    for parent in reversed(Path(path).parents):
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return str(parent)
        except OSError:
            return str(parent)
    return None


def unshare_mounts(pool_dir: str) -> dict:
    """What the worker mounts at ``unshare`` (root in its own mount namespace, before it drops to
    the call's uid), so that a private uid reaches the Python trees wherever they live without a
    permission changed on the host: each directory closed to other users above a tree (a ``0700``
    home, a ``0700`` checkout under /tmp) is covered by an empty tmpfs holding only the paths down
    to the trees, which are bound back read-only; the pool's own directory, if it lies there, is
    bound back as it was. Trees that other users can already reach are bound read-only over
    themselves."""
    shadows: dict[str, list[str]] = {}
    in_place = []
    for path in exposed_paths():
        closed = _closed_ancestor(path)
        if closed is None:
            in_place.append(path)
        else:
            shadows.setdefault(closed, []).append(path)
    return {
        "shadow": sorted(shadows.items()),
        "read_only": in_place,
        "keep": [pool_dir] if any(inside(pool_dir, a) for a in shadows) else [],
    }


def worker_env(workdir: str) -> dict[str, str]:
    """The whole environment of a worker: nothing of the trainer's (API keys stay outside)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": workdir,
    }


def layer_prefix(level: str, limits: SandboxLimits) -> list[str]:
    return {"bwrap": _bwrap_command(limits.workdir_mb), "unshare": _unshare_command(), "rlimits": []}[level]

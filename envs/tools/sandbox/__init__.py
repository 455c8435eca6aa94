"""An isolated, warm pool that runs model-written Python over the task's images.

Layers, strongest first; :func:`detect_isolation` picks at start-up the best that works here and
every result reports it (``SandboxResult.isolation``, ``ToolResult.metadata["isolation"]``):

``bwrap``    bubblewrap: new network namespace (a private loopback: no route out, not even to
             the host's 127.0.0.1), new PID/IPC/UTS namespaces, a mount namespace that shows only
             ``/usr`` and the Python trees (read-only), a private ``/dev`` and ``/proc``, and a
             size-capped tmpfs work dir; ``--die-with-parent``.
``unshare``  util-linux ``unshare`` as root: new network/PID/IPC/UTS/mount namespaces (fresh
             ``/proc``), but the host file system stays visible (the Python trees read-only).
``rlimits``  a plain child process: only the layers below.

The Python trees are the interpreter's installation (its standard library included), the venv,
where PIL/numpy live, and the interpreter's own files outside them (``libpython``), each shown at
its own path wherever it lives -- under ``/tmp`` (bwrap mounts its fresh ``/tmp`` first, then
binds them into it), under a ``0700`` home -- and nothing else of the directories above them: at
``bwrap`` those are empty directories, at ``unshare`` each directory closed to other users above a
tree is covered, in the worker's own mount namespace, by a tmpfs that leads only to the trees. No
permission on the host is changed, and a call's private uid reads exactly those files.

A floor: ``SandboxPool(min_isolation=..., private_uid=...)`` (and the python tool's config keys of
those names) refuses to start below it (:class:`IsolationBelowFloor`), naming for each stronger
choice what was missing -- bubblewrap, root, the path a private uid could not read -- and the fix.
The training configs ask for ``bwrap`` with a private uid; the default floor accepts any layer.

Two start methods, the same layers and guarantees (``SandboxPool(start=...)``):

``fork``     (default) ``size`` *template* processes (default 1), each started exactly as a spawned
             worker is (same layer command, empty environment, ``python -I``): it imports
             PIL/numpy once, makes itself non-dumpable and then never runs model code. Per call the
             trainer hands it the call's pipes and files (SCM_RIGHTS) and it forks the call's
             supervisor, which at ``bwrap`` and ``unshare`` is PID 1 of *fresh* mount/PID/network/
             IPC/UTS namespaces for this call alone, mounts a fresh ``/proc`` and a fresh
             size-capped tmpfs work dir (``workdir_mb``, also at ``unshare``) and forks the process
             that runs the code (``_worker.py`` describes the processes). Shared between calls: the
             template's mounts (at ``bwrap`` ``/usr``; the Python trees, read-only) and
             its imported memory image, copied on write and never executed upon by model code (the
             interpreter's string-hash seed included; ``random``'s and numpy's global generators
             are reseeded per call). Per call: the processes, uid, namespaces, ``/proc``, work dir,
             fds, rlimits and CPU budget; closing the call's lifeline pipe makes its supervisor kill
             the whole tree, and EOF on its status pipe says it is gone. A call costs ~10 ms of
             CPU (forks, namespaces, the code), so calls never wait on an interpreter start; a
             template that dies is restarted (calls in flight on it get a clear error, later calls
             go to the new one).
``spawn``    a fresh ``python -I`` per call, from ``size`` workers (default 2) started ahead: ~10-30
             ms when a ready worker waits, but each start costs ~0.1-0.5 s of CPU, so back-to-back
             calls queue behind starts. The fallback, and the baseline of ``benchmarks/bench_tools.py``.

Always, under every layer and start method: a fresh process per call that runs nothing but this
call (never the trainer: a template is started like a worker, not forked from the trainer), an
empty environment (no secrets inherited), ``PR_SET_NO_NEW_PRIVS``, rlimits (CPU seconds, address
space, file size, open files, processes, no core), exactly four fds (0: the job, 1 and 2: the
output files, the result pipe: 3 under ``fork``), a wall-clock timeout after which the whole
process tree is killed (PID namespace teardown; a uid-wide sweep at ``rlimits``),
stdout/stderr in trainer-owned files read back truncated, and returned images capped in count and
pixels and sent as raw RGB (the trainer never decodes or unpickles what the sandbox writes). When
the trainer is root, each call also drops to its own uid (61000 + slot, a slot handed out again
only after that call's processes are gone: other users' files, signals to other processes and the
per-uid process count then apply) -- under ``bwrap`` and ``unshare`` whenever the trees' own files
are readable by other users; under ``rlimits`` only if the directories above them can be entered
too (a Python under ``/root`` cannot: ``Isolation.own_uid`` says which). Inside, a Python audit
hook ("guard", PEP 578) refuses sockets, process creation, signals to other pids, ctypes, gc
introspection and file access outside the work dir -- defence in depth only: it stops Python
code, not native code.

What it does NOT stop: CPU and memory-bandwidth contention with the trainer (no cgroup CPU share;
a call may use one core up to its CPU-time limit); side channels; kernel exploits (no seccomp
filter); tmpfs pages (up to ``workdir_mb`` per call) count against host memory. At ``unshare``
and ``rlimits``: native code that gets past the guard (a C extension already imported, an
interpreter bug) sees the host file system with the worker's uid -- and that uid is **root** when
``own_uid`` is false, so such code could read or write any host file; at ``rlimits`` it could also
reach the network, signal other processes (the trainer and, under ``fork``, the template
included, if they share the uid) and fill the disk file by file within the timeout. Training asks
for ``bwrap`` (``apt-get install bubblewrap``) through its floor; ``AXPO_SANDBOX_ISOLATION`` pins
a layer (below a floor, the pool refuses to start and names the variable).

Two time limits, never racing: ``cpu_s`` of CPU time counted exactly from the start of the code
and ``timeout_s`` of wall-clock time from the job's hand-over. Which one fired is read from what the
worker did, not guessed from timing: the worker sends a ``b"cpu"`` frame the moment its CPU budget is
spent (then the code gets ``CPUTimeExceeded``), and a worker ended by ``SIGXCPU`` was ended by the
kernel's CPU backstop; anything still running at the wall deadline without having sent that frame is
killed by the wall clock. Once the CPU limit has fired the trainer waits up to ``CPU_REPORT_GRACE_S``
past either deadline for the report. ``SandboxResult.limit`` names the limit (``cpu_time`` /
``wall_clock``) and the error says it in a fixed sentence, so a spinning loop gets the same report
every run. A single-threaded loop cannot reach ``cpu_s`` before ``timeout_s`` when ``cpu_s >=
timeout_s`` (the wall clock then stops it); with ``cpu_s`` well below ``timeout_s`` the CPU limit
does, unless the machine is so loaded that the worker gets less than ``cpu_s / timeout_s`` of a core.

:meth:`SandboxPool.arun` never blocks the event loop and is not bounded by asyncio's default
thread pool: under ``fork`` it is asyncio-native (the call's pipes are watched by the loop), under
``spawn`` it runs on the pool's own threads. :meth:`SandboxPool.run` is the blocking form (any
thread). Measured rates: ``benchmarks/bench_tools.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import fcntl
import functools
import itertools
import json
import logging
import os
import pickle
import queue
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

__all__ = [
    "ISOLATION_LEVELS",
    "START_METHODS",
    "Isolation",
    "IsolationBelowFloor",
    "SandboxLimits",
    "SandboxResult",
    "SandboxPool",
    "SandboxUnavailable",
    "check_floor",
    "detect_isolation",
    "isolation_level",
    "meets_floor",
]

_log = logging.getLogger(__name__)
ISOLATION_LEVELS = ("bwrap", "unshare", "rlimits")
START_METHODS = ("fork", "spawn")
"""``fork``: calls forked from a warm template process; ``spawn``: a fresh interpreter per call."""
WORKER_SOURCE = (Path(__file__).with_name("_worker.py")).read_text()
SANDBOX_WORKDIR = "/sandbox"
CPU_MARKER = b"cpu"
"""The frame a worker sends the moment its CPU budget is spent (``_worker.py``)."""
CPU_REPORT_GRACE_S = 3.0
"""Wall-clock seconds a worker whose CPU limit fired gets to send its report (its kernel backstop
ends it within about two CPU seconds)."""
CPU_LIMIT, WALL_LIMIT = "cpu_time", "wall_clock"
"""Values of :attr:`SandboxResult.limit`."""
UID_BASE, UID_SLOTS = 61000, 512
_SEPARATE_INIT = False
"""Tests only: under ``fork`` as root, give each call a separate namespace init (the path a
non-root trainer takes) instead of making its supervisor PID 1 of the call's namespace."""
TEMPLATE_RESULT_FD = 3
"""The result pipe's fd in a forked call (a spawned worker's is whatever ``pass_fds`` gave)."""
SUPERVISOR_EXIT_S = 30.0
"""How long a finished call's supervisor may take to exit before the trainer sweeps its uid."""
BLOCKED_EVENTS = (
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.sendto", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at",
    "ctypes.wstring_at", "ctypes.addressof", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "os.setuid", "os.setgid", "os.chroot", "mmap.__new__",
)

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


# ----------------------------------------------------------------------------------------------
# Commands for each isolation layer


def _python_roots() -> tuple[str, ...]:
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
        if not any(_inside(path, k) for k in kept):
            kept.append(path)
    return tuple(kept)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Shown read-only by bwrap as they are; at ``unshare`` and ``rlimits`` the host's own."""


def _interpreter_files() -> set[str]:
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
def _exposed_paths() -> tuple[str, ...]:
    """What a call sees of the Python installation beyond the system trees, read-only, at its own
    path: the interpreter's and the venv's trees, PIL's and numpy's, and the interpreter's files
    outside them. Nothing else of the directories above them. Computed once per process (a
    spawned worker per call would otherwise read ``/proc/self/maps`` each time)."""
    roots = _python_roots()
    files = {f for f in _interpreter_files() if not any(_inside(f, r) for r in roots)}
    return tuple(p for p in _outermost(set(roots) | files) if not any(_inside(p, s) for s in SYSTEM_TREES))


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
    exposed = _exposed_paths()
    # bwrap creates missing parents 0700; the worker's uid must traverse them. They are empty:
    # nothing else of a home or a checkout the trees live in is shown.
    parents = sorted({str(p) for path in exposed for p in Path(path).parents} - {"/", "/tmp"}, key=len)
    for parent in parents:
        cmd += ["--perms", "0755", "--dir", parent]
    for path in exposed:
        cmd += ["--ro-bind", path, path]
    cmd += ["--chdir", SANDBOX_WORKDIR, "--clearenv"]
    for key, value in _worker_env(SANDBOX_WORKDIR).items():
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


def _unshare_mounts(pool_dir: str) -> dict:
    """What the worker mounts at ``unshare`` (root in its own mount namespace, before it drops to
    the call's uid), so that a private uid reaches the Python trees wherever they live without a
    permission changed on the host: each directory closed to other users above a tree (a ``0700``
    home, a ``0700`` checkout under /tmp) is covered by an empty tmpfs holding only the paths down
    to the trees, which are bound back read-only; the pool's own directory, if it lies there, is
    bound back as it was. Trees that other users can already reach are bound read-only over
    themselves."""
    shadows: dict[str, list[str]] = {}
    in_place = []
    for path in _exposed_paths():
        closed = _closed_ancestor(path)
        if closed is None:
            in_place.append(path)
        else:
            shadows.setdefault(closed, []).append(path)
    return {
        "shadow": sorted(shadows.items()),
        "read_only": in_place,
        "keep": [pool_dir] if any(_inside(pool_dir, a) for a in shadows) else [],
    }


def _worker_env(workdir: str) -> dict[str, str]:
    """The whole environment of a worker: nothing of the trainer's (API keys stay outside)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": workdir,
    }


def _worker_config(level: str, limits: SandboxLimits, tmp_root: str, **extra: Any) -> dict:
    """The JSON config a worker or template gets as ``argv[1]`` (no secrets: it is visible in ``ps``)."""
    config = {
        "mode": "spawn", "level": level, "result_fd": None, "uid": None, "max_processes": limits.max_processes,
        "max_open_files": limits.max_open_files, "file_size_bytes": limits.file_size_mb << 20,
        "memory_bytes": limits.memory_mb << 20, "workdir_bytes": limits.workdir_mb << 20,
        "max_images": limits.max_images, "max_image_pixels": limits.max_image_pixels,
        "max_decode_pixels": limits.max_decode_pixels, "guard": limits.python_guard,
        "blocked_events": BLOCKED_EVENTS, "read_roots": list(_python_roots()) + ["/usr/share", "/etc/localtime"],
        "pool": tmp_root,  # names the owning pool in `ps` output
        "mounts": _unshare_mounts(tmp_root) if level == "unshare" else None,
    }
    config.update(extra)
    return config


def _layer_prefix(level: str, limits: SandboxLimits) -> list[str]:
    return {"bwrap": _bwrap_command(limits.workdir_mb), "unshare": _unshare_command(), "rlimits": []}[level]


# ----------------------------------------------------------------------------------------------
# What both start methods share: the end of a call, the result, uids


def _describe_end(status: dict | None) -> tuple[str, str]:
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


def _finish(limits: SandboxLimits, level: str, start: float, error: str, limit: str, cpu_fired: bool,
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


def _truncated(data: bytes, total: int, max_chars: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) > max_chars or total > len(data):
        text = text[:max_chars] + f"\n[... output truncated: {total} bytes in all]"
    return text


def _read_header(header: bytes, limits: SandboxLimits) -> tuple[str, bool, list[str], list[tuple[int, int]]]:
    """A worker's JSON header (untrusted): its error, whether it reports the CPU limit, its notes
    (capped) and the checked sizes of the images that follow (at most ``max_images``)."""
    meta = json.loads(header)
    return (str(meta.get("error") or ""), meta.get("limit") == CPU_LIMIT,
            [str(n)[:300] for n in meta.get("notes", [])][:10],
            [_check_image_size(size, limits) for size in meta.get("images", [])[: limits.max_images]])


def _check_image_size(size: Any, limits: SandboxLimits) -> tuple[int, int]:
    w, h = int(size[0]), int(size[1])
    if not (0 < w and 0 < h and w * h <= limits.max_image_pixels):
        raise ValueError(f"worker announced an image of {w}x{h}")
    return w, h


class _UidSlots:
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


_SLOTS = _UidSlots()
PROBE_UID = UID_BASE + UID_SLOTS - 1


# ----------------------------------------------------------------------------------------------
# start="spawn": one worker process per call


class _Worker:
    """One sandboxed process that serves exactly one job."""

    def __init__(self, level: str, limits: SandboxLimits, uid: int | None, tmp_root: str) -> None:
        self.level, self.limits, self.uid = level, limits, uid
        self.dir = tempfile.mkdtemp(prefix="w", dir=tmp_root)
        os.chmod(self.dir, 0o711)  # the worker's uid must reach its work dir by absolute path
        self.stdout_path, self.stderr_path = os.path.join(self.dir, "stdout"), os.path.join(self.dir, "stderr")
        host_workdir = os.path.join(self.dir, "work")
        workdir = SANDBOX_WORKDIR if level == "bwrap" else host_workdir
        if level != "bwrap":
            os.mkdir(host_workdir, 0o700)
            if uid is not None:
                os.chown(host_workdir, uid, uid)
        read_fd, write_fd = os.pipe()
        config = _worker_config(level, limits, tmp_root, uid=uid, result_fd=write_fd)
        cmd = _layer_prefix(level, limits) + [sys.executable, "-I", "-u", "-c", WORKER_SOURCE, json.dumps(config)]
        self.started = time.perf_counter()
        try:
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(write_fd,),
                    cwd=None if level == "bwrap" else host_workdir, env=_worker_env(workdir),
                    start_new_session=True,
                )
        finally:
            os.close(write_fd)
        self.result_fd = read_fd
        _widen_pipe(self.proc.stdin.fileno())
        _widen_pipe(read_fd)

    def wait_ready(self, timeout: float) -> None:
        frame = self._read_frame(time.monotonic() + timeout, 64)
        if frame != b"ready":
            self.kill()
            raise SandboxUnavailable(f"{self.level} worker did not start: {self.read_stream(self.stderr_path, 2000)!r}")

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        chunks, have = [], 0
        while have < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not _wait_readable(self.result_fd, left):
                raise TimeoutError
            chunk = os.read(self.result_fd, min(n - have, 1 << 20))
            if not chunk:
                return None  # the worker closed the pipe (exited or was killed)
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def _read_frame(self, deadline: float, max_len: int) -> bytes | None:
        head = self._read_exact(4, deadline)
        if head is None:
            return None
        (length,) = struct.unpack(">I", head)
        if length > max_len:
            raise ValueError(f"worker sent a {length}-byte frame, more than {max_len}")
        return self._read_exact(length, deadline)

    def run(self, code: str, images: Sequence[Any]) -> SandboxResult:
        limits = self.limits
        start = time.perf_counter()
        deadline = time.monotonic() + limits.timeout_s
        job = pickle.dumps({"code": code, "images": [_raw_image(im) for im in images], "cpu_seconds": limits.cpu_s})
        error, limit, out_images, notes, answered, cpu_fired = "", "", [], [], False, False
        try:
            self.proc.stdin.write(job)
            self.proc.stdin.close()
            header = self._read_frame(deadline, 1 << 20)
            if header == CPU_MARKER:  # the CPU limit fired: the report follows (or the backstop ends it)
                cpu_fired = True
                deadline = max(deadline, time.monotonic() + CPU_REPORT_GRACE_S)
                header = self._read_frame(deadline, 1 << 20)
            if header is None:
                error, signame = self._death_message()
                cpu_fired = cpu_fired or signame == "SIGXCPU"
            else:
                error, cpu_reported, notes, sizes = _read_header(header, limits)
                cpu_fired = cpu_fired or cpu_reported
                for w, h in sizes:
                    out_images.append(self._read_image(w, h, deadline))
                answered = True
        except TimeoutError:
            limit = WALL_LIMIT  # unless the CPU limit fired first (in _finish)
        except Exception as exc:  # whatever the sandbox sends is untrusted: never let it raise here
            error = f"the sandbox worker failed: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            if not answered:  # the tree must be dead before its output is read; else the pool reaps it
                self.kill()
        return _finish(limits, self.level, start, error, limit, cpu_fired, out_images, notes,
                       self.read_stream(self.stdout_path, limits.max_output_chars),
                       self.read_stream(self.stderr_path, limits.max_output_chars))

    def _read_image(self, w: int, h: int, deadline: float) -> Any:
        raw = self._read_frame(deadline, w * h * 3)
        if raw is None or len(raw) != w * h * 3:
            raise ValueError("worker sent a truncated image")
        return Image.frombytes("RGB", (w, h), raw)

    def _death_message(self) -> tuple[str, str]:
        """Why the worker ended without answering, and the signal that ended it ('' if none)."""
        try:
            status = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return _describe_end(None)
        if status < 0:
            return _describe_end({"signal": -status})
        if self.level in ("bwrap", "unshare") and status > 128:
            return _describe_end({"signal": status - 128})  # bwrap/unshare: a child killed by signal N is 128 + N
        return _describe_end({"exit": status})

    @staticmethod
    def read_stream(path: str, max_chars: int) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read(max_chars * 4 + 4)
                total = os.fstat(f.fileno()).st_size
        except OSError:
            return ""
        return _truncated(data, total, max_chars)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the whole process tree and close the result pipe."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.level == "rlimits" and self.uid is not None:
            _kill_uid(self.uid)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            os.close(self.result_fd)
        except OSError:
            pass
        self.result_fd = -1

    def cleanup(self) -> None:
        """After :meth:`kill`: remove the worker's files and free its uid."""
        shutil.rmtree(self.dir, ignore_errors=True)
        _SLOTS.release(self.uid)
        self.uid = None


def _widen_pipe(fd: int) -> None:
    """Grow a pipe to 1 MiB: a job or result then crosses in one write instead of a context switch
    per 64 KiB (which costs milliseconds each on a loaded machine)."""
    try:
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ (Linux)
    except OSError:
        pass


def _raw_image(image: Any) -> tuple[str, tuple[int, int], bytes]:
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    return image.mode, image.size, image.tobytes()


def _kill_uid(uid: int) -> None:
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


def _wait_readable(fd: int, timeout: float) -> bool:
    """poll(2), not select(2): a trainer may hold more than FD_SETSIZE (1024) fds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


# ----------------------------------------------------------------------------------------------
# start="fork": calls forked from a warm template process


async def _wait_fd(fd: int, deadline: float, write: bool = False) -> None:
    """Until ``fd`` is readable (writable) on the running loop; TimeoutError at ``deadline``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(exc: BaseException | None = None) -> None:
        if not future.done():
            future.set_result(None) if exc is None else future.set_exception(exc)

    (loop.add_writer if write else loop.add_reader)(fd, settle)
    timer = loop.call_later(left, settle, TimeoutError())
    try:
        await future
    finally:
        timer.cancel()
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await _wait_fd(fd, deadline, write=True)


class _PipeReader:
    """Buffered reads of one non-blocking pipe on the running event loop."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.eof = fd, bytearray(), False

    async def _fill(self, deadline: float) -> bool:
        while not self.eof:
            if time.monotonic() >= deadline:  # past it, even if data waits: the wall clock fired first
                raise TimeoutError
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                await _wait_fd(self.fd, deadline)
                continue
            if chunk:
                self.buffer += chunk
                return True
            self.eof = True
        return False

    async def exact(self, n: int, deadline: float) -> bytes | None:
        """``n`` bytes, or None when the writers closed the pipe first."""
        while len(self.buffer) < n:
            if not await self._fill(deadline):
                return None
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def frame(self, deadline: float, max_len: int) -> bytes | None:
        head = await self.exact(4, deadline)
        if head is None:
            return None
        (length,) = struct.unpack(">I", head)
        if length > max_len:
            raise ValueError(f"worker sent a {length}-byte frame, more than {max_len}")
        return await self.exact(length, deadline)

    async def line(self, deadline: float) -> bytes | None:
        while b"\n" not in self.buffer:
            if not await self._fill(deadline):
                return None
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer[:] = rest
        return line

    async def drain(self, deadline: float) -> None:
        """Until EOF: every writer (the call's supervisor) is gone."""
        while await self._fill(deadline):
            self.buffer.clear()


def _anonymous_file(directory: str) -> int:
    """A read-write file with no name (nothing to clean up, nobody can open it by path)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(dir=directory)
        os.unlink(path)
        return fd


def _read_output(fd: int, max_chars: int) -> str:
    try:
        return _truncated(os.pread(fd, max_chars * 4 + 4, 0), os.fstat(fd).st_size, max_chars)
    except OSError:
        return ""


class _TemplateGone(Exception):
    """A request could not be handed to a template (it died or hangs)."""


class _Template:
    """One warm template process (``_worker.py``, ``mode="template"``) and our end of its control
    socket. It is started exactly as a spawned worker is (same layer command, environment, flags)."""

    def __init__(self, level: str, limits: SandboxLimits, tmp_root: str, workdir: str, name: str) -> None:
        self.level, self.workdir, self.dead = level, workdir, False
        self.log_path = os.path.join(tmp_root, f"{name}.log")
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            config = _worker_config(level, limits, tmp_root, mode="template", control_fd=theirs.fileno(),
                                    result_fd=TEMPLATE_RESULT_FD, supervisor_is_init=not _SEPARATE_INIT)
            cmd = _layer_prefix(level, limits) + [sys.executable, "-I", "-u", "-c", WORKER_SOURCE, json.dumps(config)]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(theirs.fileno(),),
                    cwd=None if level == "bwrap" else workdir, env=_worker_env(workdir), start_new_session=True,
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.sock.settimeout(10)  # a template that does not take a request in 10 s is replaced

    def wait_ready(self, timeout: float) -> None:
        message = b""
        try:
            if _wait_readable(self.sock.fileno(), timeout):
                message = self.sock.recv(64)
        except OSError:
            pass
        if message != b"ready":
            self.kill()
            raise SandboxUnavailable(f"{self.level} template did not start: {self.log_tail()!r}")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def send(self, payload: bytes, fds: list[int]) -> None:
        try:
            with self._lock:
                socket.send_fds(self.sock, [payload], fds)
        except OSError as exc:  # EPIPE / ECONNRESET: it died; a timeout: it hangs; EBADF: killed
            self.dead = True
            raise _TemplateGone(f"{type(exc).__name__}: {exc}") from None

    def is_gone(self) -> bool:
        """Dead, or about to be: it exited, or its end of the control socket closed (it never
        writes after ``ready``, so a readable socket means EOF)."""
        if not self.dead:
            try:
                self.dead = self.proc.poll() is not None or _wait_readable(self.sock.fileno(), 0)
            except (OSError, ValueError):
                self.dead = True
        return self.dead

    def kill(self) -> None:
        """Kill it and (at bwrap/unshare, whose namespaces it lives in) every call forked from it."""
        self.dead = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with self._lock:
            self.sock.close()


class _Reaper:
    """Off every call's path: waits until a finished call's supervisor has exited (EOF on the call's
    status pipe: its processes are gone), then frees the call's uid and work dir. A supervisor
    still there after ``SUPERVISOR_EXIT_S`` gets the call's uid swept first (the trainer is root
    whenever calls have uids)."""

    def __init__(self) -> None:
        self._poller = select.poll()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._poller.register(self._wake_r, select.POLLIN)
        self._incoming: collections.deque = collections.deque()
        self._pending: dict[int, tuple[int | None, str | None, float]] = {}
        self._stop_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name="axpo-sandbox-reaper", daemon=True)
        self._thread.start()

    def add(self, status_fd: int, uid: int | None, workdir: str | None) -> None:
        """Takes ``status_fd`` over."""
        if self._stop_at is not None:  # the pool is closed: wait here (a call that outlived close())
            _wait_readable(status_fd, 5)
            self._free(status_fd, uid, workdir, sweep=True)
            return
        self._incoming.append((status_fd, uid, workdir, time.monotonic() + SUPERVISOR_EXIT_S))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        while True:
            while self._incoming:
                fd, uid, workdir, deadline = self._incoming.popleft()
                self._pending[fd] = (uid, workdir, deadline)
                self._poller.register(fd, select.POLLIN)
            now = time.monotonic()
            if self._stop_at is not None and (not self._pending or now > self._stop_at):
                break
            deadlines = [d for _, _, d in self._pending.values()] + ([self._stop_at] if self._stop_at else [])
            timeout = max(0.0, min(deadlines) - now) * 1000 if deadlines else None
            for fd, _ in self._poller.poll(timeout):
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data and fd in self._pending:
                    self._finish(fd, sweep=False)
            now = time.monotonic()
            for fd, (_, _, deadline) in list(self._pending.items()):
                if now > deadline:
                    _log.warning("a python sandbox call's supervisor did not exit in %.0f s: sweeping its uid", SUPERVISOR_EXIT_S)
                    self._finish(fd, sweep=True)
        for fd in list(self._pending):
            self._finish(fd, sweep=True)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _finish(self, fd: int, sweep: bool) -> None:
        uid, workdir, _ = self._pending.pop(fd)
        self._poller.unregister(fd)
        self._free(fd, uid, workdir, sweep)

    @staticmethod
    def _free(fd: int, uid: int | None, workdir: str | None, sweep: bool) -> None:
        os.close(fd)
        if sweep and uid is not None:
            _kill_uid(uid)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        _SLOTS.release(uid)

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the supervisors still running; sweep the rest."""
        self._stop_at = time.monotonic() + timeout
        self._wake()
        self._thread.join(timeout + 30)


class _ForkCall:
    """One call on the trainer's side: our ends of its pipes and its output files; the template
    gets the other ends (and the files) with the request."""

    def __init__(self, backend: "_ForkBackend", template: _Template, uid: int | None) -> None:
        self.backend, self.template, self.uid = backend, template, uid
        self.workdir: str | None = None  # ours to remove (rlimits: a host dir per call)
        self.ours: dict[str, int] = {}
        theirs: list[int] = []
        try:
            if backend.level == "rlimits":
                workdir = self.workdir = tempfile.mkdtemp(prefix="c", dir=backend.tmp_root)
                if uid is not None:
                    os.chown(workdir, uid, uid)
            else:
                workdir = template.workdir  # a mount point: the call mounts its own tmpfs there
            for ours_name, mine_first in (("job", False), ("result", True), ("lifeline", False), ("status", True)):
                read_end, write_end = os.pipe()
                self.ours[ours_name] = read_end if mine_first else write_end
                theirs.append(write_end if mine_first else read_end)
            job_r, result_w, lifeline_r, status_w = theirs
            self.ours["stdout"], self.ours["stderr"] = _anonymous_file(backend.tmp_root), _anonymous_file(backend.tmp_root)
            _widen_pipe(self.ours["job"])
            _widen_pipe(self.ours["result"])
            for name in ("job", "result", "status"):
                os.set_blocking(self.ours[name], False)
            request = json.dumps({"uid": uid, "workdir": workdir}).encode()
            template.send(request, [job_r, result_w, self.ours["stdout"], self.ours["stderr"], lifeline_r, status_w])
        except BaseException:
            self._close_ours()
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self.results, self.status = _PipeReader(self.ours["result"]), _PipeReader(self.ours["status"])

    def _close(self, name: str) -> None:
        fd = self.ours.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _close_ours(self) -> None:
        for name in list(self.ours):
            self._close(name)

    async def run(self, job: bytes, start: float) -> SandboxResult:
        limits = self.backend.limits
        deadline = time.monotonic() + limits.timeout_s
        error, limit, out_images, notes, answered, cpu_fired = "", "", [], [], False, False
        try:
            try:
                await _write_all(self.ours["job"], job, deadline)
            except BrokenPipeError:
                pass  # it died before reading its job: its status says why
            finally:
                self._close("job")
            header = await self.results.frame(deadline, 1 << 20)
            if header == CPU_MARKER:  # the CPU limit fired: the report follows (or the backstop ends it)
                cpu_fired = True
                deadline = max(deadline, time.monotonic() + CPU_REPORT_GRACE_S)
                header = await self.results.frame(deadline, 1 << 20)
            if header is None:
                error, signame = await self._death_message()
                cpu_fired = cpu_fired or signame == "SIGXCPU"
            else:
                error, cpu_reported, notes, sizes = _read_header(header, limits)
                cpu_fired = cpu_fired or cpu_reported
                for w, h in sizes:
                    raw = await self.results.frame(deadline, w * h * 3)
                    if raw is None or len(raw) != w * h * 3:
                        raise ValueError("worker sent a truncated image")
                    out_images.append(Image.frombytes("RGB", (w, h), raw))
                answered = True
        except TimeoutError:
            limit = WALL_LIMIT  # unless the CPU limit fired first (in _finish)
        except Exception as exc:  # whatever the sandbox sends is untrusted: never let it raise here
            error = f"the sandbox worker failed: {type(exc).__name__}: {str(exc)[:200]}"
        if not answered:  # kill the call's tree and wait until it is gone: its output is then final
            self._close("lifeline")
            try:
                await self.status.drain(time.monotonic() + 5)
            except TimeoutError:
                pass
        return _finish(limits, self.backend.level, start, error, limit, cpu_fired, out_images, notes,
                       _read_output(self.ours["stdout"], limits.max_output_chars),
                       _read_output(self.ours["stderr"], limits.max_output_chars))

    async def _death_message(self) -> tuple[str, str]:
        """The call's exit status, written by its namespace init (or, at rlimits, its supervisor)."""
        status = None
        try:
            line = await self.status.line(time.monotonic() + 2)
            status = json.loads(line) if line else None
        except (TimeoutError, ValueError):
            pass
        if not isinstance(status, dict):
            status = None
            for _ in range(20):  # no status at all: was its template killed?
                if self.template.is_gone():
                    return "the sandbox template serving this call died (the pool starts a new one); the call was lost", ""
                await asyncio.sleep(0.05)
        return _describe_end(status)

    def release(self, reaper: _Reaper) -> None:
        """Close the lifeline (the supervisor kills what is left) and our fds; the reaper frees
        the uid and work dir once the supervisor is gone."""
        self._close("lifeline")
        status_fd = self.ours.pop("status")
        self._close_ours()
        if self.status.eof:
            os.close(status_fd)
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            _SLOTS.release(self.uid)
        else:
            reaper.add(status_fd, self.uid, self.workdir)


class _ForkBackend:
    """``size`` templates, restarted when one dies, and the calls forked from them."""

    def __init__(self, isolation: Isolation, limits: SandboxLimits, size: int, tmp_root: str) -> None:
        self.level, self.own_uid, self.limits, self.tmp_root = isolation.level, isolation.own_uid, limits, tmp_root
        if self.level == "bwrap":
            self.workdir = SANDBOX_WORKDIR
        elif self.level == "unshare":
            self.workdir = os.path.join(tmp_root, "work")  # each call mounts its own tmpfs over it
            os.mkdir(self.workdir, 0o755)
        else:
            self.workdir = tmp_root  # the template's; each call gets its own directory
        self._names, self._turn = itertools.count(), itertools.count()
        self._closed, self._start_error = False, ""
        self.templates: list[_Template] = []
        self._reaper = _Reaper()
        self._wake_r, self._wake_w = os.pipe()
        # Templates are started (and restarted) by this long-lived thread only: bwrap's
        # --die-with-parent follows the *thread* that started it (PR_SET_PDEATHSIG), and a caller's
        # thread (asyncio.to_thread, an executor) may end any time.
        self._started = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, args=(max(1, size),), name="axpo-sandbox-templates",
                                         daemon=True)
        self._monitor.start()
        self._started.wait()
        if not self.templates:
            self._reaper.close(0)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            raise SandboxUnavailable(self._start_error)

    def _new_template(self) -> _Template:
        return _Template(self.level, self.limits, self.tmp_root, self.workdir, f"t{next(self._names)}")

    def _start_all(self, size: int) -> None:
        started = []
        try:
            for _ in range(size):
                started.append(self._new_template())
            for template in started:
                template.wait_ready(60)
            self.templates = started
        except Exception as exc:
            for template in started:
                template.kill()
            self._start_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._started.set()

    def _monitor_loop(self, size: int) -> None:
        """Start the templates, then replace one the moment it dies (its control socket closes)."""
        self._start_all(size)
        while self.templates and not self._closed:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for template in self.templates:
                if not template.dead:
                    try:
                        poller.register(template.sock.fileno(), select.POLLIN)
                    except (OSError, ValueError):
                        pass
            poller.poll(1000)
            if self._closed:
                return
            for i, template in enumerate(list(self.templates)):
                if template.is_gone():
                    self._replace(i, template)
            if _wait_readable(self._wake_r, 0):
                os.read(self._wake_r, 4096)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _replace(self, i: int, old: _Template) -> None:
        code = old.proc.poll()
        _log.warning("python sandbox template (pid %s) died (exit status %s): %s; starting a new one",
                     old.proc.pid, code, old.log_tail()[-300:].strip())
        old.kill()
        while not self._closed:
            try:
                new = self._new_template()
                new.wait_ready(60)
            except Exception as exc:
                self._start_error = f"{type(exc).__name__}: {exc}"
                time.sleep(1)
                continue
            if self._closed:
                new.kill()
                return
            self.templates[i] = new
            self._start_error = ""
            return

    async def _open(self) -> _ForkCall:
        deadline = time.monotonic() + 120
        lost = ""
        while True:
            if self._closed:
                raise SandboxUnavailable("the sandbox pool is closed")
            live = [t for t in self.templates if not t.is_gone()]
            if live:
                template = live[next(self._turn) % len(live)]
                uid = _SLOTS.acquire() if self.own_uid else None
                try:
                    return _ForkCall(self, template, uid)
                except _TemplateGone as exc:  # it died under us: the next one (or its replacement)
                    _SLOTS.release(uid)
                    lost = str(exc)
                    self._wake()
                except OSError as exc:  # out of fds, disk ...
                    _SLOTS.release(uid)
                    raise SandboxUnavailable(f"could not set up a sandbox call: {type(exc).__name__}: {exc}") from None
                except BaseException:
                    _SLOTS.release(uid)
                    raise
            if time.monotonic() > deadline:
                raise SandboxUnavailable(f"no sandbox template is running: {self._start_error or lost}")
            await asyncio.sleep(0.02)

    async def call(self, code: str, images: Sequence[Any]) -> SandboxResult:
        start = time.perf_counter()
        job = pickle.dumps({"code": code, "images": [_raw_image(im) for im in images], "cpu_seconds": self.limits.cpu_s})
        call = await self._open()
        try:
            return await call.run(job, start)
        finally:
            call.release(self._reaper)

    def standby_pids(self) -> list[int]:
        return [t.proc.pid for t in self.templates if not t.dead]

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._monitor.join(timeout=90)
        for template in self.templates:
            template.kill()
        self._reaper.close(timeout=10)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _run_sync(make_coroutine: Any) -> Any:
    """Run a coroutine to the end from blocking code (on a helper thread if this one runs a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coroutine())
    with concurrent.futures.ThreadPoolExecutor(1) as helper:
        return helper.submit(lambda: asyncio.run(make_coroutine())).result()


# ----------------------------------------------------------------------------------------------
# Isolation detection

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
            worker = _Worker(level, limits, PROBE_UID if own_uid else None, tmp_root)
            try:
                worker.wait_ready(30)
                result = worker.run(PROBE_CODE, [])
            finally:
                worker.kill()
        else:
            backend = _ForkBackend(Isolation(level, own_uid), limits, 1, tmp_root)
            try:
                result = _run_sync(lambda: backend.call(PROBE_CODE, []))
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


# ----------------------------------------------------------------------------------------------
# The floor: the weakest isolation a pool accepts


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
    targets = sorted(_interpreter_files()) + [os.path.join(stdlib["stdlib"], "os.py"), stdlib["platstdlib"],
                                              sysconfig.get_paths()["purelib"]]
    for module in ("PIL", "numpy"):
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, "__file__", None):
            targets.append(loaded.__file__)
    exposed = _exposed_paths() + SYSTEM_TREES
    for target in map(os.path.realpath, targets):
        top = next((root for root in exposed if _inside(target, root)), "/") if level != "rlimits" else "/"
        chain = [str(p) for p in reversed(Path(target).parents) if _inside(str(p), top)] + [target]
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


# ----------------------------------------------------------------------------------------------
# The pool


class SandboxPool:
    """Isolated calls: ``start="fork"`` (default) forks each from one of ``size`` (default 1) warm
    template processes, ``start="spawn"`` keeps ``size`` (default 2) fresh interpreters started.
    :meth:`run` is thread-safe and blocking, :meth:`arun` its async form (never capped by asyncio's
    default thread pool)."""

    SPAWN_THREADS = 256
    """Threads for concurrent ``spawn`` calls from :meth:`arun` (each waits on its worker)."""

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
        self.size = max(1, int(size if size is not None else (1 if start == "fork" else 2)))
        self._closed = False
        self._tmp_root = tempfile.mkdtemp(prefix="axpo-sandbox-")
        os.chmod(self._tmp_root, 0o711)  # calls' uids may enter their own dir, never list others
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        if start == "fork":
            try:
                self._backend = _ForkBackend(self.isolation, self.limits, self.size, self._tmp_root)
            except BaseException:
                shutil.rmtree(self._tmp_root, ignore_errors=True)
                raise
        else:
            self._ready: queue.Queue[_Worker] = queue.Queue()
            self._wanted = threading.Semaphore(0)
            self._spawn_error: BaseException | None = None
            for _ in range(self.size):
                self._wanted.release()
            self._filler = threading.Thread(target=self._fill_loop, name="axpo-sandbox-filler", daemon=True)
            self._filler.start()
            self._dead: queue.Queue[_Worker | None] = queue.Queue()
            self._reaper = threading.Thread(target=self._reap_loop, name="axpo-sandbox-reaper", daemon=True)
            self._reaper.start()
        atexit.register(self.close)  # templates / idle workers must not outlive an interpreter that forgot close()

    def run(self, code: str, images: Sequence[Any] = ()) -> SandboxResult:
        """Run ``code`` in a fresh sandboxed process; ``images`` are PIL images (``images`` in the code)."""
        if self.start == "fork":
            return _run_sync(lambda: self._backend.call(code, images))
        return self._spawn_run(code, images)

    async def arun(self, code: str, images: Sequence[Any] = ()) -> SandboxResult:
        if self.start == "fork":
            return await self._backend.call(code, images)
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.SPAWN_THREADS, thread_name_prefix="axpo-sandbox-call")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._spawn_run, code, images)

    def _standby_pids(self) -> list[int]:
        """Pids of the processes waiting for calls (templates, or ready spawned workers): the
        root of each one's process tree (its bwrap / unshare command when there is one)."""
        if self.start == "fork":
            return self._backend.standby_pids()
        return [w.proc.pid for w in list(self._ready.queue)]

    # -- start="spawn"

    def _fill_loop(self) -> None:
        """Start a replacement for every worker taken, one at a time (spawning is CPU-bound)."""
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            worker = None
            try:
                uid = _SLOTS.acquire() if self.isolation.own_uid else None
                try:
                    worker = _Worker(self.isolation.level, self.limits, uid, self._tmp_root)
                except BaseException:
                    _SLOTS.release(uid)
                    raise
                worker.wait_ready(60)
                self._spawn_error = None
            except Exception as exc:  # reported to callers waiting in _take
                if worker is not None:
                    worker.cleanup()
                self._spawn_error = exc
                time.sleep(0.5)
                self._wanted.release()
                continue
            if self._closed:
                worker.kill()
                worker.cleanup()
                return
            self._ready.put(worker)

    def _take(self) -> _Worker:
        deadline = time.monotonic() + 120
        while True:
            if self._closed:
                raise SandboxUnavailable("the sandbox pool is closed")
            try:
                worker = self._ready.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise SandboxUnavailable(f"no sandbox worker became ready: {self._spawn_error!r}") from None
                continue
            self._wanted.release()
            if worker.alive():
                return worker
            worker.kill()
            worker.cleanup()

    def _spawn_run(self, code: str, images: Sequence[Any]) -> SandboxResult:
        worker = self._take()
        try:
            return worker.run(code, images)
        finally:
            if self._closed:  # the reaper may be gone
                worker.kill()
                worker.cleanup()
            else:
                self._dead.put(worker)  # killed and removed off the caller's path

    def _reap_loop(self) -> None:
        """Kill what is left of used workers (children the code started) and delete their files."""
        while True:
            worker = self._dead.get()
            if worker is None:
                return
            worker.kill()
            worker.cleanup()

    def close(self) -> None:
        """Stop serving and kill every template / idle worker (idempotent)."""
        atexit.unregister(self.close)
        if self._closed:
            return
        self._closed = True
        if self.start == "fork":
            self._backend.close()
        else:
            self._close_spawn()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def _close_spawn(self) -> None:
        self._wanted.release()
        while True:
            try:
                worker = self._ready.get_nowait()
            except queue.Empty:
                break
            worker.kill()
            worker.cleanup()
        self._filler.join(timeout=10)
        self._dead.put(None)
        self._reaper.join(timeout=30)
        while True:  # a worker the filler finished while we were draining
            try:
                worker = self._ready.get_nowait()
            except queue.Empty:
                break
            worker.kill()
            worker.cleanup()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

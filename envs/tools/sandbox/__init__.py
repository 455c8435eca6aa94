"""An isolated, warm worker pool that runs model-written Python over the task's images.

Layers, strongest first; :func:`detect_isolation` picks at start-up the best that works here and
every result reports it (``SandboxResult.isolation``, ``ToolResult.metadata["isolation"]``):

``bwrap``    bubblewrap: new network namespace (a private loopback: no route out, not even to
             the host's 127.0.0.1), new PID/IPC/UTS namespaces, a mount namespace that shows only
             ``/usr`` and the Python installation (read-only), a private ``/dev`` and ``/proc``,
             and a size-capped tmpfs work dir; ``--die-with-parent``.
``unshare``  util-linux ``unshare`` as root: new network/PID/IPC/UTS/mount namespaces (fresh
             ``/proc``), but the host file system stays visible.
``rlimits``  a plain child process: only the layers below.

Always, under every layer: a fresh ``python -I`` process per call (no memory shared with the
trainer; it is never forked from it), an empty environment (no secrets inherited),
``PR_SET_NO_NEW_PRIVS``, rlimits (CPU seconds, address space, file size, open files, processes,
no core), a wall-clock timeout after which the whole process tree is killed (PID namespace
teardown; a uid-wide sweep at ``rlimits``), stdout/stderr in trainer-owned files read back
truncated, and returned images capped in count and pixels and sent as raw RGB (the trainer never
decodes or unpickles what the sandbox writes). When the trainer is root, each worker also drops
to its own uid (61000 + slot: other users' files, signals to other processes and the per-uid
process count then apply) -- always under ``bwrap``; under ``unshare``/``rlimits`` only if the
interpreter is readable by another uid (a Python under ``/root`` is not: ``Isolation.own_uid``
says which). Inside, a Python audit hook ("guard", PEP 578) refuses sockets, process creation,
signals to other pids, ctypes, gc introspection and file access outside the work dir -- defence
in depth only: it stops Python code, not native code.

What it does NOT stop: CPU and memory-bandwidth contention with the trainer (no cgroup CPU share;
a call may use one core up to its CPU-time limit); side channels; kernel exploits (no seccomp
filter); tmpfs pages (up to ``workdir_mb`` per worker) count against host memory. At ``unshare``
and ``rlimits``: native code that gets past the guard (a C extension already imported, an
interpreter bug) sees the host file system with the worker's uid -- and that uid is **root** when
``own_uid`` is false, so such code could read or write any host file; at ``rlimits`` it could also
reach the network, signal other processes (the trainer included, if it shares the uid) and fill
the disk file by file within the timeout. Use ``bwrap`` (``apt-get install bubblewrap``) for
training; ``AXPO_SANDBOX_ISOLATION`` pins a layer.

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

The pool keeps ``size`` workers started, imported (PIL, numpy) and waiting inside the sandbox;
a call takes one, sends the job, reads the result; a background thread kills what is left of the
worker's process tree and deletes its files, another starts its replacement, so one call can never
poison the next. A warm call costs ~10-30 ms; starting a worker ~0.2-0.5 s of CPU, so size the
pool to the number of calls in flight (``benchmarks/bench_tools.py``).
"""

from __future__ import annotations

import asyncio
import atexit
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
    "Isolation",
    "SandboxLimits",
    "SandboxResult",
    "SandboxPool",
    "SandboxUnavailable",
    "detect_isolation",
    "isolation_level",
]

_log = logging.getLogger(__name__)
ISOLATION_LEVELS = ("bwrap", "unshare", "rlimits")
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


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits; ``PythonCodeTool(**config)`` accepts each field by name."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 32
    workdir_mb: int = 256
    """Size of the tmpfs work dir (``bwrap`` only; elsewhere ``file_size_mb`` caps each file)."""
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
    """True when each worker runs under its own uid (trainer is root)."""
    detail: str = ""


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
    # Keep only the outermost directories.
    ordered = sorted(roots, key=len)
    kept: list[str] = []
    for root in ordered:
        if not any(root == k or root.startswith(k + "/") for k in kept):
            kept.append(root)
    return tuple(kept)


def _bwrap_command(workdir_mb: int) -> list[str]:
    cmd = [
        "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr",
    ]
    if os.geteuid() != 0:
        cmd.insert(1, "--unshare-user")  # unprivileged: bwrap needs a user namespace for the mounts
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    roots = [root for root in _python_roots() if not root.startswith("/usr/")]
    # bwrap creates missing parents 0700; the worker's uid must traverse them.
    parents = sorted({str(p) for root in roots for p in Path(root).parents if str(p) != "/"}, key=len)
    for parent in parents:
        cmd += ["--perms", "0755", "--dir", parent]
    for root in roots:
        cmd += ["--ro-bind", root, root]
    cmd += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(workdir_mb * 1024 * 1024), "--perms", "01777", "--tmpfs", SANDBOX_WORKDIR,
        # A /tmp to change into (a habit of model code), as at the other layers; nothing to write
        # there (the work dir is the one writable place): read-only and one page in size.
        "--size", "4096", "--perms", "0555", "--tmpfs", "/tmp",
        "--chdir", SANDBOX_WORKDIR, "--clearenv",
    ]
    for key, value in _worker_env(SANDBOX_WORKDIR).items():
        cmd += ["--setenv", key, value]
    return cmd


def _unshare_command() -> list[str]:
    # A shell as the namespace's PID 1 (not the worker): the kernel drops default-action signals
    # such as RLIMIT_CPU's SIGXCPU sent to a namespace init, and unshare turns a child's death by
    # signal into status 1; the shell passes the worker's 128 + N on.
    return ["unshare", "--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc",
            "/bin/sh", "-c", '"$@"; exit $?', "sh"]


def _worker_env(workdir: str) -> dict[str, str]:
    """The whole environment of a worker: nothing of the trainer's (API keys stay outside)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": workdir,
    }


# ----------------------------------------------------------------------------------------------
# One worker


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
        config = {
            "result_fd": None, "uid": uid, "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files, "file_size_bytes": limits.file_size_mb << 20,
            "memory_bytes": limits.memory_mb << 20, "max_images": limits.max_images,
            "max_image_pixels": limits.max_image_pixels, "max_decode_pixels": limits.max_decode_pixels,
            "guard": limits.python_guard, "blocked_events": BLOCKED_EVENTS,
            "read_roots": list(_python_roots()) + ["/usr/share", "/etc/localtime"],
            "pool": tmp_root,  # names the owning pool in `ps` output
        }
        read_fd, write_fd = os.pipe()
        config["result_fd"] = write_fd
        prefix = {"bwrap": _bwrap_command(limits.workdir_mb), "unshare": _unshare_command(), "rlimits": []}[level]
        cmd = prefix + [sys.executable, "-I", "-u", "-c", WORKER_SOURCE, json.dumps(config)]
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
            ready, _, _ = select.select([self.result_fd], [], [], left)
            if not ready:
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
                meta = json.loads(header)
                error = str(meta.get("error") or "")
                cpu_fired = cpu_fired or meta.get("limit") == CPU_LIMIT
                notes = [str(n)[:300] for n in meta.get("notes", [])][:10]
                for size in meta.get("images", [])[: limits.max_images]:
                    out_images.append(self._read_image(size, deadline))
                answered = True
        except TimeoutError:
            limit = WALL_LIMIT  # unless the CPU limit fired first (below)
        except Exception as exc:  # whatever the sandbox sends is untrusted: never let it raise here
            error = f"the sandbox worker failed: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            if not answered:  # the tree must be dead before its output is read; else the pool reaps it
                self.kill()
        if cpu_fired:
            limit = CPU_LIMIT
        if limit == CPU_LIMIT:
            error = f"CPU-time limit: the code used more than its {limits.cpu_s:g} s of CPU time and was stopped"
        elif limit == WALL_LIMIT:
            error = f"wall-clock limit: the code ran past its {limits.timeout_s:g} s time limit (wall clock); its process tree was killed"
        return SandboxResult(
            stdout=self.read_stream(self.stdout_path, limits.max_output_chars),
            stderr=self.read_stream(self.stderr_path, limits.max_output_chars),
            images=tuple(out_images), error=error, timed_out=limit == WALL_LIMIT, limit=limit,
            notes=tuple(notes), seconds=time.perf_counter() - start, isolation=self.level,
        )

    def _read_image(self, size: Any, deadline: float) -> Any:
        w, h = int(size[0]), int(size[1])
        if not (0 < w and 0 < h and w * h <= self.limits.max_image_pixels):
            raise ValueError(f"worker announced an image of {w}x{h}")
        raw = self._read_frame(deadline, w * h * 3)
        if raw is None or len(raw) != w * h * 3:
            raise ValueError("worker sent a truncated image")
        return Image.frombytes("RGB", (w, h), raw)

    def _death_message(self) -> tuple[str, str]:
        """Why the worker ended without answering, and the signal that ended it ('' if none)."""
        try:
            status = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "the sandbox worker closed its result channel without answering", ""
        signum = -status if status < 0 else 0
        if not signum and self.level in ("bwrap", "unshare") and status > 128:
            signum = status - 128  # bwrap/unshare report a child killed by signal N as exit status 128 + N
        try:
            name = signal.Signals(signum).name if signum else ""
        except ValueError:
            name = ""
        if name:
            return f"the sandbox worker was killed by {name}", name
        return f"the sandbox worker exited with status {status} without a result", ""

    @staticmethod
    def read_stream(path: str, max_chars: int) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read(max_chars * 4 + 4)
                total = os.fstat(f.fileno()).st_size
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace")
        if len(text) > max_chars or total > len(data):
            text = text[:max_chars] + f"\n[... output truncated: {total} bytes in all]"
        return text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the whole process tree and remove the worker's files."""
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
        shutil.rmtree(self.dir, ignore_errors=True)


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


# ----------------------------------------------------------------------------------------------
# Isolation detection


@functools.lru_cache(maxsize=None)
def detect_isolation(prefer: str = "auto") -> Isolation:
    """The strongest layer that runs a real worker end to end here (``prefer`` forces one).

    ``prefer="auto"`` reads the ``AXPO_SANDBOX_ISOLATION`` environment variable (a layer name or
    ``auto``). Order: bwrap > unshare > rlimits; at each, a private uid per worker when the trainer is root
    and the interpreter is reachable by another uid (a Python under ``/root`` is not, outside
    bwrap's mount namespace). Cached per process: a probe costs one worker start (~0.2-0.5 s).
    """
    if prefer == "auto":
        prefer = os.environ.get("AXPO_SANDBOX_ISOLATION", "auto")  # operators can pin a layer per node
    if prefer != "auto" and prefer not in ISOLATION_LEVELS:
        raise ValueError(f"isolation={prefer!r}: expected 'auto' or one of {ISOLATION_LEVELS}")
    candidates = ISOLATION_LEVELS if prefer == "auto" else (prefer,)
    uid_options = (True, False) if os.geteuid() == 0 else (False,)
    reasons = []
    for level in candidates:
        for own_uid in uid_options:
            reason = _probe(level, own_uid)
            if reason is None:
                detail = "; ".join(reasons) or "strongest layer available"
                return Isolation(level=level, own_uid=own_uid, detail=detail)
            reasons.append(f"{level}{' with a private uid' if own_uid else ''} unavailable: {reason}")
    raise SandboxUnavailable("; ".join(reasons))


def _probe(level: str, own_uid: bool) -> str | None:
    """None when ``level`` works, else why not."""
    if level == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap is not installed"
    if level == "unshare" and (shutil.which("unshare") is None or os.geteuid() != 0):
        return "needs root and util-linux unshare"
    tmp_root = tempfile.mkdtemp(prefix="axpo-sandbox-probe-")
    os.chmod(tmp_root, 0o711)
    uid = UID_BASE + UID_SLOTS - 1 if own_uid else None
    try:
        worker = _Worker(level, SandboxLimits(timeout_s=20), uid, tmp_root)
        try:
            worker.wait_ready(30)
            result = worker.run("print(6 * 7)", [])
        finally:
            worker.kill()
        if result.stdout.strip() != "42":
            return f"probe printed {result.stdout!r}, error {result.error!r}, stderr {result.stderr[-300:]!r}"
        return None
    except (OSError, SandboxUnavailable, TimeoutError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc)[-300:]}"
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def isolation_level() -> str:
    """The layer a default :class:`SandboxPool` uses on this machine (``bwrap``/``unshare``/``rlimits``)."""
    return detect_isolation().level


# ----------------------------------------------------------------------------------------------
# The pool

# One uid sequence per process (all pools share it), started at a pid-dependent offset so that two
# trainer processes on one node rarely hand out the same uid at the same time.
_UIDS = itertools.count(os.getpid() * 61 % (UID_SLOTS - 1))
_UID_LOCK = threading.Lock()


class SandboxPool:
    """``size`` warm workers; :meth:`run` is thread-safe and blocking, :meth:`arun` is its async form."""

    def __init__(self, limits: SandboxLimits | None = None, size: int = 2, isolation: str = "auto") -> None:
        self.limits = limits or SandboxLimits()
        self.isolation = detect_isolation(isolation)
        if self.isolation.level != "bwrap":
            _log.warning("python sandbox runs at the weaker %r layer (own uid: %s): %s",
                         self.isolation.level, self.isolation.own_uid, self.isolation.detail)
        self.size = max(1, int(size))
        self._ready: queue.Queue[_Worker] = queue.Queue()
        self._wanted = threading.Semaphore(0)
        self._closed = False
        self._spawn_error: BaseException | None = None
        self._tmp_root = tempfile.mkdtemp(prefix="axpo-sandbox-")
        os.chmod(self._tmp_root, 0o711)  # workers' uids may enter their own dir, never list others
        for _ in range(self.size):
            self._wanted.release()
        self._filler = threading.Thread(target=self._fill_loop, name="axpo-sandbox-filler", daemon=True)
        self._filler.start()
        self._dead: queue.Queue[_Worker | None] = queue.Queue()
        self._reaper = threading.Thread(target=self._reap_loop, name="axpo-sandbox-reaper", daemon=True)
        self._reaper.start()
        atexit.register(self.close)  # idle workers must not outlive an interpreter that forgot close()

    def _next_uid(self) -> int | None:
        if not self.isolation.own_uid:
            return None
        with _UID_LOCK:
            return UID_BASE + next(_UIDS) % (UID_SLOTS - 1)

    def _fill_loop(self) -> None:
        """Start a replacement for every worker taken, one at a time (spawning is CPU-bound)."""
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            try:
                worker = _Worker(self.isolation.level, self.limits, self._next_uid(), self._tmp_root)
                worker.wait_ready(60)
                self._spawn_error = None
            except Exception as exc:  # reported to callers waiting in _take
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

    def run(self, code: str, images: Sequence[Any] = ()) -> SandboxResult:
        """Run ``code`` in a fresh sandboxed worker; ``images`` are PIL images (``images`` in the code)."""
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

    async def arun(self, code: str, images: Sequence[Any] = ()) -> SandboxResult:
        return await asyncio.to_thread(self.run, code, images)

    def close(self) -> None:
        """Stop refilling and kill every idle worker (idempotent)."""
        atexit.unregister(self.close)
        self._closed = True
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
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

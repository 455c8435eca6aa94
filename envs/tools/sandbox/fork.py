"""``start="fork"``: calls forked from warm template processes (``_worker.py`` describes the
processes of a call), restarted when one dies, and the reaper that frees a call's uid and work
dir once its processes are gone."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Sequence

from .backend import SandboxBackend, run_sync
from .launch import worker_command, worker_config
from .layers import SANDBOX_WORKDIR, Isolation, worker_env
from .results import (WALL_LIMIT, SandboxLimits, SandboxResult, SandboxUnavailable, describe_end, finish_result,
                      truncated)
from .uids import SLOTS, kill_uid
from .wire import (CPU_MARKER, CPU_REPORT_GRACE_S, AsyncPipeReader, encode_job, image_from_frame, read_header,
                   wait_readable, widen_pipe, write_all)

_log = logging.getLogger(__name__)
_SEPARATE_INIT = False
"""Tests only: under ``fork`` as root, give each call a separate namespace init (the path a
non-root trainer takes) instead of making its supervisor PID 1 of the call's namespace."""
TEMPLATE_RESULT_FD = 3
"""The result pipe's fd in a forked call (a spawned worker's is whatever ``pass_fds`` gave)."""
SUPERVISOR_EXIT_S = 30.0
"""How long a finished call's supervisor may take to exit before the trainer sweeps its uid."""


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
        return truncated(os.pread(fd, max_chars * 4 + 4, 0), os.fstat(fd).st_size, max_chars)
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
            config = worker_config(level, limits, tmp_root, mode="template", control_fd=theirs.fileno(),
                                    result_fd=TEMPLATE_RESULT_FD, supervisor_is_init=not _SEPARATE_INIT)
            cmd = worker_command(level, limits, config)
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(theirs.fileno(),),
                    cwd=None if level == "bwrap" else workdir, env=worker_env(workdir), start_new_session=True,
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
            if wait_readable(self.sock.fileno(), timeout):
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
                self.dead = self.proc.poll() is not None or wait_readable(self.sock.fileno(), 0)
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
            wait_readable(status_fd, 5)
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
            kill_uid(uid)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        SLOTS.release(uid)

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the supervisors still running; sweep the rest."""
        self._stop_at = time.monotonic() + timeout
        self._wake()
        self._thread.join(timeout + 30)


class _ForkCall:
    """One call on the trainer's side: our ends of its pipes and its output files; the template
    gets the other ends (and the files) with the request."""

    def __init__(self, backend: "ForkBackend", template: _Template, uid: int | None) -> None:
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
            widen_pipe(self.ours["job"])
            widen_pipe(self.ours["result"])
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
        self.results, self.status = AsyncPipeReader(self.ours["result"]), AsyncPipeReader(self.ours["status"])

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
                await write_all(self.ours["job"], job, deadline)
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
                error, cpu_reported, notes, sizes = read_header(header, limits)
                cpu_fired = cpu_fired or cpu_reported
                for w, h in sizes:
                    out_images.append(image_from_frame(await self.results.frame(deadline, w * h * 3), w, h))
                answered = True
        except TimeoutError:
            limit = WALL_LIMIT  # unless the CPU limit fired first (in finish_result)
        except Exception as exc:  # whatever the sandbox sends is untrusted: never let it raise here
            error = f"the sandbox worker failed: {type(exc).__name__}: {str(exc)[:200]}"
        if not answered:  # kill the call's tree and wait until it is gone: its output is then final
            self._close("lifeline")
            try:
                await self.status.drain(time.monotonic() + 5)
            except TimeoutError:
                pass
        return finish_result(limits, self.backend.level, start, error, limit, cpu_fired, out_images, notes,
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
        return describe_end(status)

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
            SLOTS.release(self.uid)
        else:
            reaper.add(status_fd, self.uid, self.workdir)


class ForkBackend(SandboxBackend):
    """``size`` templates, restarted when one dies, and the calls forked from them."""

    default_size = 1

    def __init__(self, isolation: Isolation, limits: SandboxLimits, size: int, tmp_root: str) -> None:
        super().__init__(isolation, limits, size, tmp_root)
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
            if wait_readable(self._wake_r, 0):
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
                uid = SLOTS.acquire() if self.own_uid else None
                try:
                    return _ForkCall(self, template, uid)
                except _TemplateGone as exc:  # it died under us: the next one (or its replacement)
                    SLOTS.release(uid)
                    lost = str(exc)
                    self._wake()
                except OSError as exc:  # out of fds, disk ...
                    SLOTS.release(uid)
                    raise SandboxUnavailable(f"could not set up a sandbox call: {type(exc).__name__}: {exc}") from None
                except BaseException:
                    SLOTS.release(uid)
                    raise
            if time.monotonic() > deadline:
                raise SandboxUnavailable(f"no sandbox template is running: {self._start_error or lost}")
            await asyncio.sleep(0.02)

    def run(self, code: str, images: Sequence[Any]) -> SandboxResult:
        return run_sync(lambda: self.arun(code, images))

    async def arun(self, code: str, images: Sequence[Any]) -> SandboxResult:
        start = time.perf_counter()
        job = encode_job(code, images, self.limits)
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

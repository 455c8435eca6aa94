"""``start="spawn"``: a fresh ``python -I`` per call, from workers started ahead (the fallback,
and the baseline of ``benchmarks/bench_tools.py``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Sequence

from .backend import SandboxBackend
from .launch import worker_command, worker_config
from .layers import SANDBOX_WORKDIR, Isolation, worker_env
from .results import (WALL_LIMIT, SandboxLimits, SandboxResult, SandboxUnavailable, describe_end, finish_result,
                      truncated)
from .uids import SLOTS, kill_uid
from .wire import CPU_MARKER, CPU_REPORT_GRACE_S, PipeReader, encode_job, image_from_frame, read_header, widen_pipe


class Worker:
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
        config = worker_config(level, limits, tmp_root, uid=uid, result_fd=write_fd)
        cmd = worker_command(level, limits, config)
        self.started = time.perf_counter()
        try:
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(write_fd,),
                    cwd=None if level == "bwrap" else host_workdir, env=worker_env(workdir),
                    start_new_session=True,
                )
        finally:
            os.close(write_fd)
        self.result_fd = read_fd
        self.results = PipeReader(read_fd)
        widen_pipe(self.proc.stdin.fileno())
        widen_pipe(read_fd)

    def wait_ready(self, timeout: float) -> None:
        frame = self.results.frame(time.monotonic() + timeout, 64)
        if frame != b"ready":
            self.kill()
            raise SandboxUnavailable(f"{self.level} worker did not start: {self.read_stream(self.stderr_path, 2000)!r}")

    def run(self, code: str, images: Sequence[Any]) -> SandboxResult:
        limits = self.limits
        start = time.perf_counter()
        deadline = time.monotonic() + limits.timeout_s
        job = encode_job(code, images, limits)
        error, limit, out_images, notes, answered, cpu_fired = "", "", [], [], False, False
        try:
            self.proc.stdin.write(job)
            self.proc.stdin.close()
            header = self.results.frame(deadline, 1 << 20)
            if header == CPU_MARKER:  # the CPU limit fired: the report follows (or the backstop ends it)
                cpu_fired = True
                deadline = max(deadline, time.monotonic() + CPU_REPORT_GRACE_S)
                header = self.results.frame(deadline, 1 << 20)
            if header is None:
                error, signame = self._death_message()
                cpu_fired = cpu_fired or signame == "SIGXCPU"
            else:
                error, cpu_reported, notes, sizes = read_header(header, limits)
                cpu_fired = cpu_fired or cpu_reported
                for w, h in sizes:
                    out_images.append(image_from_frame(self.results.frame(deadline, w * h * 3), w, h))
                answered = True
        except TimeoutError:
            limit = WALL_LIMIT  # unless the CPU limit fired first (in finish_result)
        except Exception as exc:  # whatever the sandbox sends is untrusted: never let it raise here
            error = f"the sandbox worker failed: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            if not answered:  # the tree must be dead before its output is read; else the pool reaps it
                self.kill()
        return finish_result(limits, self.level, start, error, limit, cpu_fired, out_images, notes,
                       self.read_stream(self.stdout_path, limits.max_output_chars),
                       self.read_stream(self.stderr_path, limits.max_output_chars))

    def _death_message(self) -> tuple[str, str]:
        """Why the worker ended without answering, and the signal that ended it ('' if none)."""
        try:
            status = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return describe_end(None)
        if status < 0:
            return describe_end({"signal": -status})
        if self.level in ("bwrap", "unshare") and status > 128:
            return describe_end({"signal": status - 128})  # bwrap/unshare: a child killed by signal N is 128 + N
        return describe_end({"exit": status})

    @staticmethod
    def read_stream(path: str, max_chars: int) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read(max_chars * 4 + 4)
                total = os.fstat(f.fileno()).st_size
        except OSError:
            return ""
        return truncated(data, total, max_chars)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the whole process tree and close the result pipe."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.level == "rlimits" and self.uid is not None:
            kill_uid(self.uid)
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
        SLOTS.release(self.uid)
        self.uid = None


class SpawnBackend(SandboxBackend):
    """``size`` workers started ahead, one per call: a filler thread starts a replacement for each
    worker taken, a reaper thread kills what a used one left and removes its files."""

    default_size = 2
    THREADS = 256
    """Threads for concurrent calls from :meth:`arun` (each waits on its worker)."""

    def __init__(self, isolation: Isolation, limits: SandboxLimits, size: int, tmp_root: str) -> None:
        super().__init__(isolation, limits, size, tmp_root)
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._ready: queue.Queue[Worker] = queue.Queue()
        self._wanted = threading.Semaphore(0)
        self._spawn_error: BaseException | None = None
        for _ in range(self.size):
            self._wanted.release()
        self._filler = threading.Thread(target=self._fill_loop, name="axpo-sandbox-filler", daemon=True)
        self._filler.start()
        self._dead: queue.Queue[Worker | None] = queue.Queue()
        self._reaper = threading.Thread(target=self._reap_loop, name="axpo-sandbox-reaper", daemon=True)
        self._reaper.start()

    async def arun(self, code: str, images: Sequence[Any]) -> SandboxResult:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="axpo-sandbox-call")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run, code, images)

    def standby_pids(self) -> list[int]:
        return [w.proc.pid for w in list(self._ready.queue)]

    def _fill_loop(self) -> None:
        """Start a replacement for every worker taken, one at a time (spawning is CPU-bound)."""
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            worker = None
            try:
                uid = SLOTS.acquire() if self.isolation.own_uid else None
                try:
                    worker = Worker(self.isolation.level, self.limits, uid, self.tmp_root)
                except BaseException:
                    SLOTS.release(uid)
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

    def _take(self) -> Worker:
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

    def run(self, code: str, images: Sequence[Any]) -> SandboxResult:
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
        self._closed = True
        self._wanted.release()
        self._discard_ready()
        self._filler.join(timeout=10)
        self._dead.put(None)
        self._reaper.join(timeout=30)
        self._discard_ready()  # a worker the filler finished while we were draining
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _discard_ready(self) -> None:
        """Kill every ready worker and remove its files."""
        while True:
            try:
                worker = self._ready.get_nowait()
            except queue.Empty:
                return
            worker.kill()
            worker.cleanup()

"""The wire between the trainer and a sandboxed process: the job it is handed, the frames it
sends back (the JSON header, the images) and the readers of those frames.

Everything read here comes from model-run code and is untrusted: frame lengths, header fields and
image sizes are checked before anything is allocated for them.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pickle
import select
import struct
import time
from typing import Any, Sequence

from PIL import Image

from .results import CPU_LIMIT, SandboxLimits

CPU_MARKER = b"cpu"
"""The frame a worker sends the moment its CPU budget is spent (``_worker.py``)."""
CPU_REPORT_GRACE_S = 3.0
"""Wall-clock seconds a worker whose CPU limit fired gets to send its report (its kernel backstop
ends it within about two CPU seconds)."""


def read_header(header: bytes, limits: SandboxLimits) -> tuple[str, bool, list[str], list[tuple[int, int]]]:
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


def image_from_frame(raw: bytes | None, w: int, h: int) -> Image.Image:
    """An image the worker sent as a frame of raw RGB, after a header announced its size."""
    if raw is None or len(raw) != w * h * 3:
        raise ValueError("worker sent a truncated image")
    return Image.frombytes("RGB", (w, h), raw)


def widen_pipe(fd: int) -> None:
    """Grow a pipe to 1 MiB: a job or result then crosses in one write instead of a context switch
    per 64 KiB (which costs milliseconds each on a loaded machine)."""
    try:
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ (Linux)
    except OSError:
        pass


def raw_image(image: Any) -> tuple[str, tuple[int, int], bytes]:
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    return image.mode, image.size, image.tobytes()


def wait_readable(fd: int, timeout: float) -> bool:
    """poll(2), not select(2): a trainer may hold more than FD_SETSIZE (1024) fds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


async def wait_fd(fd: int, deadline: float, write: bool = False) -> None:
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


async def write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await wait_fd(fd, deadline, write=True)


def encode_job(code: str, images: Sequence[Any], limits: SandboxLimits) -> bytes:
    """The job a worker reads on its stdin (the trusted direction: the trainer pickles, the worker
    unpickles): the code, the input images as raw pixels, and the CPU budget."""
    return pickle.dumps({"code": code, "images": [raw_image(im) for im in images], "cpu_seconds": limits.cpu_s})


class FrameBuffer:
    """The bytes read so far from one pipe, and the frames (a 4-byte big-endian length, then that
    many bytes: ``_worker.py``'s ``send_frame``) and lines in them. No I/O: the blocking and the
    asyncio readers below fill it, each the way its caller waits."""

    HEADER = struct.Struct(">I")

    def __init__(self) -> None:
        self.data, self.eof = bytearray(), False

    def feed(self, chunk: bytes) -> None:
        """Bytes read from the pipe; an empty chunk is its end."""
        if chunk:
            self.data += chunk
        else:
            self.eof = True

    def frame(self, max_len: int) -> bytes | None:
        """The next whole frame, or None until it has arrived. ValueError as soon as a length
        above ``max_len`` is announced (the sender is untrusted: nothing that long is read)."""
        if len(self.data) < self.HEADER.size:
            return None
        (length,) = self.HEADER.unpack_from(self.data)
        if length > max_len:
            raise ValueError(f"worker sent a {length}-byte frame, more than {max_len}")
        end = self.HEADER.size + length
        if len(self.data) < end:
            return None
        payload = bytes(self.data[self.HEADER.size:end])
        del self.data[:end]
        return payload

    def line(self) -> bytes | None:
        """The next newline-terminated line (without its newline), or None until it has arrived."""
        end = self.data.find(b"\n")
        if end < 0:
            return None
        line = bytes(self.data[:end])
        del self.data[:end + 1]
        return line


class PipeReader:
    """Blocking reads of frames from one pipe (any thread), each bounded by a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, FrameBuffer()

    def _fill(self, deadline: float) -> bool:
        """Read what the pipe holds; False at its end, TimeoutError past ``deadline``."""
        if self.buffer.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable(self.fd, left):
            raise TimeoutError
        self.buffer.feed(os.read(self.fd, 1 << 20))
        return not self.buffer.eof

    def frame(self, deadline: float, max_len: int) -> bytes | None:
        """The next frame, or None when the writers closed the pipe first."""
        while (frame := self.buffer.frame(max_len)) is None:
            if not self._fill(deadline):
                return None
        return frame


class AsyncPipeReader:
    """Reads of frames and lines from one non-blocking pipe on the running event loop."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, FrameBuffer()

    @property
    def eof(self) -> bool:
        return self.buffer.eof

    async def _fill(self, deadline: float) -> bool:
        while not self.buffer.eof:
            if time.monotonic() >= deadline:  # past it, even if data waits: the wall clock fired first
                raise TimeoutError
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                await wait_fd(self.fd, deadline)
                continue
            self.buffer.feed(chunk)
            return bool(chunk)
        return False

    async def frame(self, deadline: float, max_len: int) -> bytes | None:
        """The next frame, or None when the writers closed the pipe first."""
        while (frame := self.buffer.frame(max_len)) is None:
            if not await self._fill(deadline):
                return None
        return frame

    async def line(self, deadline: float) -> bytes | None:
        while (line := self.buffer.line()) is None:
            if not await self._fill(deadline):
                return None
        return line

    async def drain(self, deadline: float) -> None:
        """Until EOF: every writer (the call's supervisor) is gone."""
        while await self._fill(deadline):
            self.buffer.data.clear()

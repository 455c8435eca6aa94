"""The python sandbox's inner seams: the one length-prefixed frame decoder both pipe readers use,
and the backend interface the pool hands every call to (no branching on the start method)."""

import asyncio
import os
import struct
import time

import pytest

from axpo_rllm.envs.tools.sandbox import START_METHODS, Isolation, SandboxLimits, SandboxResult, pool
from axpo_rllm.envs.tools.sandbox.backend import SandboxBackend
from axpo_rllm.envs.tools.sandbox.wire import AsyncPipeReader, FrameBuffer, PipeReader


def framed(*payloads: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in payloads)


def test_frames_split_anywhere_come_out_whole():
    stream = framed(b"ready", b"", b"x" * 300) + b"tail line\n"
    for cut in range(len(stream) + 1):
        buffer, frames = FrameBuffer(), []
        for chunk in (stream[:cut], stream[cut:]):
            buffer.feed(chunk)
            while len(frames) < 3 and (frame := buffer.frame(1000)) is not None:
                frames.append(frame)
        assert frames == [b"ready", b"", b"x" * 300], cut
    assert buffer.line() == b"tail line" and buffer.line() is None


def test_an_oversized_frame_is_refused_from_its_length_alone():
    buffer = FrameBuffer()
    buffer.feed(struct.pack(">I", 65))  # no payload sent: the length alone is enough to refuse
    with pytest.raises(ValueError, match="65-byte frame, more than 64"):
        buffer.frame(64)


def pipe_with(data: bytes, close: bool) -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    if close:
        os.close(write_end)
        write_end = -1
    return read_end, write_end


def test_the_blocking_and_the_async_reader_read_the_same_frames():
    data = framed(b"header", b"\x00" * 30_000) + struct.pack(">I", 10) + b"cut"
    blocking_fd, _ = pipe_with(data, close=True)
    async_fd, _ = pipe_with(data, close=True)
    os.set_blocking(async_fd, False)
    deadline = time.monotonic() + 5
    blocking = PipeReader(blocking_fd)
    got = [blocking.frame(deadline, 1 << 20) for _ in range(3)]

    async def read_async() -> list:
        reader = AsyncPipeReader(async_fd)
        return [await reader.frame(deadline, 1 << 20) for _ in range(3)]

    # A frame the writer closed the pipe in the middle of reads as None (the worker is gone).
    assert got == asyncio.run(read_async()) == [b"header", b"\x00" * 30_000, None]
    os.close(blocking_fd)
    os.close(async_fd)


def test_the_blocking_reader_times_out_on_a_silent_pipe():
    read_end, write_end = pipe_with(framed(b"ab")[:3], close=False)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        PipeReader(read_end).frame(start + 0.2, 64)
    assert time.monotonic() - start >= 0.2
    os.close(read_end)
    os.close(write_end)


def test_every_start_method_has_a_backend():
    assert set(pool.BACKENDS) == set(START_METHODS)
    for backend in pool.BACKENDS.values():
        assert issubclass(backend, SandboxBackend) and backend.default_size >= 1


class RecordingBackend(SandboxBackend):
    default_size = 3
    made: list = []

    def __init__(self, isolation, limits, size, tmp_root):
        super().__init__(isolation, limits, size, tmp_root)
        self.calls, self.closed = [], 0
        RecordingBackend.made.append(self)

    def run(self, code, images):
        self.calls.append(("run", code))
        return SandboxResult(stdout="ran")

    async def arun(self, code, images):
        self.calls.append(("arun", code))
        return SandboxResult(stdout="aran")

    def standby_pids(self):
        return [12345]

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("start", START_METHODS)
def test_the_pool_hands_every_call_to_its_start_methods_backend(monkeypatch, start):
    monkeypatch.setattr(pool, "detect_isolation", lambda prefer, start: Isolation("bwrap", True))
    monkeypatch.setitem(pool.BACKENDS, start, RecordingBackend)
    RecordingBackend.made.clear()
    limits = SandboxLimits(timeout_s=1.0)
    sandbox = pool.SandboxPool(limits, start=start)
    (backend,) = RecordingBackend.made
    assert (sandbox.size, backend.size, backend.limits, backend.isolation.level) == (3, 3, limits, "bwrap")
    assert os.path.isdir(backend.tmp_root)
    assert sandbox.run("a").stdout == "ran" and asyncio.run(sandbox.arun("b")).stdout == "aran"
    assert backend.calls == [("run", "a"), ("arun", "b")] and sandbox._standby_pids() == [12345]
    sandbox.close()
    sandbox.close()
    assert backend.closed == 1 and not os.path.exists(backend.tmp_root)

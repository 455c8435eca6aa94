"""The python tool: run model-written Python over the task's images in a sandboxed worker.

Arguments: ``{"code": "..."}``. Inside the code, ``images`` is the list of the episode's images
(``ToolContext.images``, as PIL images; ``image`` is ``images[0]``), the same images are files
``image_0.png``, ``image_1.png``, ... in the private working directory, ``display(img)`` and
``img.show()`` return an image, and so does any new image file the code saves in the working
directory or any folder under it (also after the code changed directory).
``print`` output comes back as text (truncated). Isolation, limits and what they do not stop:
:mod:`axpo_rllm.envs.tools.sandbox`; the layer in force is in ``metadata["isolation"]``, the time
limit that stopped the code (``"cpu_time"`` / ``"wall_clock"``) in ``metadata["limit"]``.

Config (``PythonCodeTool(**config)``): every :class:`SandboxLimits` field (``timeout_s``,
``cpu_s``, ``memory_mb``, ...), plus ``start`` (``"fork"``, the default: each call forked from a
warm template process, ~10 ms of CPU; ``"spawn"``: a fresh interpreter per call, the old pool),
``pool_size`` (template processes under ``fork``, default 1; ready workers under ``spawn``, default
2), ``isolation`` (``"auto"`` or a layer name), ``max_code_chars`` (default 20000) and the floor:
``min_isolation`` (``"bwrap"`` | ``"unshare"`` | ``"rlimits"``, the default) and ``private_uid``
(default false: a private uid per call required). With a floor above the default the tool checks
it when it is built -- a run then refuses to start, naming what is missing and the fix, instead of
running model code at a weaker layer; the training configs ask for ``bwrap`` with a private uid.
The layer in force is in each result's metadata (``isolation``, ``private_uid``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Mapping

from PIL import Image

from axpo_rllm.core.config import dataclass_from_mapping
from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult
from axpo_rllm.envs.tools.sandbox import (ISOLATION_LEVELS, START_METHODS, Isolation, SandboxLimits, SandboxPool,
                                         SandboxUnavailable, check_floor, detect_isolation, meets_floor)

__all__ = ["PythonCodeTool", "check_python_config"]

_OWN_KEYS = ("pool_size", "isolation", "start", "max_code_chars", "min_isolation", "private_uid")
"""The tool's own settings; every other config key is a :class:`SandboxLimits` field."""


class PythonCodeTool(Tool):
    """Execute Python in an isolated worker; images in, text and images out."""

    name = "python"
    description = (
        "Run Python code. The images are available as `images` (a list of PIL images) and as files "
        "image_0.png, image_1.png, ... in the working directory. Print results; call display(img) or "
        "save an image file to return an image. No network access."
    )
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        limits = {k: v for k, v in config.items() if k not in _OWN_KEYS}
        self.limits = dataclass_from_mapping(SandboxLimits, limits, f"PythonCodeTool config ({', '.join(_OWN_KEYS)} or a sandbox limit)")
        size = config.get("pool_size")
        self.pool_size = None if size is None else int(size)
        self.isolation = str(config.get("isolation", "auto"))
        self.start = str(config.get("start", "fork"))
        if self.start not in START_METHODS:
            raise ValueError(f"PythonCodeTool config: start={self.start!r}, expected one of {START_METHODS}")
        self.max_code_chars = int(config.get("max_code_chars", 20000))
        self.min_isolation, self.private_uid = _floor(config, self.isolation)
        self._pool: SandboxPool | None = None
        self._pool_lock = threading.Lock()
        if self.has_floor:
            self.isolation_in_force()  # refuse here, when the run starts, not call by call

    @property
    def has_floor(self) -> bool:
        return self.min_isolation != ISOLATION_LEVELS[-1] or self.private_uid

    def isolation_in_force(self) -> Isolation:
        """The layer this tool's calls run at (a probe on first use, cached per process; no pool
        is started). :class:`IsolationBelowFloor` when it is below the tool's floor."""
        isolation = detect_isolation(self.isolation, self.start)
        check_floor(isolation, self.min_isolation, self.private_uid)
        return isolation

    def describe_isolation(self) -> str:
        """One plain sentence: the layer in force and, when it is below what training asks for
        (``bwrap`` with a private uid), that this tool's floor allows it."""
        isolation = self.isolation_in_force()
        line = f"python tool sandbox: {isolation.describe()}"
        if meets_floor(isolation.level, isolation.own_uid, "bwrap", private_uid=True):
            return line
        floor = f"{self.min_isolation}{' with a private uid' if self.private_uid else ''}"
        return (f"{line} -- weaker than the training configs' floor (bwrap with a private uid), allowed here "
                f"by min_isolation={floor} ({isolation.detail[:300]})")

    @property
    def pool(self) -> SandboxPool:
        """Started on first use, so that listing tools never spawns processes."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = SandboxPool(self.limits, size=self.pool_size, isolation=self.isolation, start=self.start,
                                         min_isolation=self.min_isolation, private_uid=self.private_uid)
            return self._pool

    def check_arguments(self, arguments: Any) -> str | ToolResult:
        """The code string, or an error result naming what is wrong with the arguments."""
        if not isinstance(arguments, dict):
            return ToolResult.fail(f"arguments must be an object with a 'code' string, got {type(arguments).__name__}", tool=self.name)
        unknown = set(arguments) - {"code"}
        if unknown:
            return ToolResult.fail(f"unknown argument(s) {sorted(map(str, unknown))[:5]}: expected only 'code'", tool=self.name)
        code = arguments.get("code")
        if not isinstance(code, str):
            return ToolResult.fail(f"code must be a string, got {type(code).__name__}", tool=self.name)
        if not code.strip():
            return ToolResult.fail("code is empty", tool=self.name)
        if len(code) > self.max_code_chars:
            return ToolResult.fail(f"code is {len(code)} characters long, more than {self.max_code_chars}", tool=self.name)
        if "\x00" in code:
            return ToolResult.fail("code contains a NUL character", tool=self.name)
        return code

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        code = self.check_arguments(arguments)
        if isinstance(code, ToolResult):
            return code
        try:
            images = _pil_images(context.images, self.limits.max_decode_pixels)
        except ValueError as exc:
            return ToolResult.fail(str(exc), tool=self.name)
        try:
            pool = self._pool or await asyncio.to_thread(getattr, self, "pool")  # first call: probe + spawn
            result = await pool.arun(code, images)
        except SandboxUnavailable as exc:
            return ToolResult.fail(f"python tool unavailable: {exc}", tool=self.name)
        metadata = {"tool": self.name, "isolation": result.isolation, "private_uid": pool.isolation.own_uid,
                    "seconds": result.seconds, "timed_out": result.timed_out, "limit": result.limit}
        text = _observation(result)
        if result.error:
            return ToolResult(text="", images=result.images, error=f"{result.error}\n{text}".strip(), metadata=metadata)
        return ToolResult(text=text or "(no output)", images=result.images, metadata=metadata)

    async def aclose(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def _floor(config: Mapping[str, Any], isolation: str) -> tuple[str, bool]:
    """``(min_isolation, private_uid)`` from a tool config, checked (also against a pinned layer)."""
    min_isolation = str(config.get("min_isolation", ISOLATION_LEVELS[-1]))
    if min_isolation not in ISOLATION_LEVELS:
        raise ValueError(f"PythonCodeTool config: min_isolation={min_isolation!r}, expected one of {ISOLATION_LEVELS}")
    private_uid = config.get("private_uid", False)
    if not isinstance(private_uid, bool):
        raise ValueError(f"PythonCodeTool config: private_uid={private_uid!r}, expected true or false")
    if isolation != "auto" and not meets_floor(isolation, True, min_isolation):
        raise ValueError(f"PythonCodeTool config: isolation={isolation!r} is below min_isolation={min_isolation!r}")
    return min_isolation, private_uid


def check_python_config(config: Mapping[str, Any] | None) -> None:
    """Build-time checks of a python tool config where a run starts (a launcher's driver): its keys
    and, with a floor, the isolation that works on this machine (:class:`IsolationBelowFloor`)."""
    PythonCodeTool(**dict(config or {}))


def _pil_images(images: tuple, max_pixels: int) -> list:
    """The context's images, decoded; a non-image, an oversized (bomb) or broken one is a ValueError."""
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {i} is a {type(image).__name__}, not a PIL image")
        if image.width * image.height > max_pixels:
            raise ValueError(f"image {i} has {image.width}x{image.height} pixels, more than the {max_pixels} the python tool accepts")
        try:
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image {i} could not be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None
    return list(images)


def _observation(result: Any) -> str:
    """stdout, then stderr and notes, labelled only when present."""
    parts = [result.stdout.rstrip("\n")] if result.stdout else []
    if result.stderr:
        parts.append(f"[stderr]\n{result.stderr.rstrip()}")
    if result.images:
        parts.append(f"[{len(result.images)} image(s) returned]")
    parts.extend(f"[note] {note}" for note in result.notes)
    return "\n".join(parts)

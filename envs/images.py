"""Image references as datasets hold them, opened only when needed.

A dataset row names its images in one of the forms the public formats use: encoded file bytes,
the ``{"bytes": ..., "path": ...}`` struct of Hugging Face's ``Image`` feature (and of verl's RL
parquet), a file path, or an already decoded ``PIL.Image.Image``. Engines take decoded images;
everything before them keeps the reference, so a dataset of 8K images costs its file size until a
question is actually asked.

:func:`probe_image` reads the header only (size, format: cheap enough for every row at load
time); :func:`open_image` decodes the pixels (a truncated file fails here, not at the probe);
:func:`image_bytes` returns the encoded bytes as stored, so converting a dataset copies images
without re-encoding them.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["ImageError", "ImageInfo", "is_image_ref", "probe_image", "open_image", "image_bytes",
           "MAX_ASPECT_RATIO", "model_image_problem"]


class ImageError(ValueError):
    """An image reference that cannot be read (missing file, undecodable bytes, unknown form)."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    """PIL's format name (``PNG``, ``JPEG`` ...); ``decoded`` for an in-memory PIL image."""


def _pil():
    return Image


def is_image_ref(value: Any) -> bool:
    """True for every form :func:`open_image` accepts (it may still fail to open)."""
    if isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike)):
        return True
    if isinstance(value, dict):
        return bool(value.get("bytes")) or bool(value.get("path"))
    return isinstance(value, _pil().Image)


_BASE64_RE = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


def _looks_like_base64(text: str) -> bool:
    """An inline base64 image (VLMEvalKit's TSVs: HR-Bench, MMBench) rather than a file name."""
    head = text[:4096]
    return len(text) >= 32 and "." not in head and _BASE64_RE.fullmatch(head) is not None  # checked after "no such file"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system (inline base64 read as a path)
        return False


def _b64decode(text: str) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"inline base64 image cannot be decoded: {exc}") from None
    if not data:
        raise ImageError("empty inline base64 image")
    return data


def _source(ref: Any, root: str | os.PathLike | None) -> tuple[str, Any]:
    """``("pil", image)``, ``("bytes", data)`` or ``("path", Path)`` for one reference."""
    Image = _pil()
    if isinstance(ref, Image.Image):
        return "pil", ref
    if isinstance(ref, (bytes, bytearray, memoryview)):
        if not len(ref):
            raise ImageError("empty image bytes")
        return "bytes", bytes(ref)
    if isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
        if data:  # Hugging Face keeps the original file name in `path` beside the bytes
            return _source(data, root)
        if path:
            return _source(path, root)
        raise ImageError(f"image struct holds neither bytes nor a path: keys {sorted(ref)}")
    if isinstance(ref, (str, os.PathLike)):
        text = os.fspath(ref)
        if isinstance(ref, str) and text.startswith("data:image/"):
            return "bytes", _b64decode(text)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if not text:
            raise ImageError("empty image path")
        path = Path(text).expanduser() if len(text) < 4096 else None
        if path is not None and not path.is_absolute() and root is not None:
            path = Path(root) / path
        if path is not None and _is_file(path):
            return "path", path
        if isinstance(ref, str) and _looks_like_base64(text):
            return "bytes", _b64decode(text)
        shown = str(path) if path is not None else text
        raise ImageError(f"image file not found: {shown[:300]}")
    raise ImageError(f"not an image reference: {type(ref).__name__} (expected bytes, a path, a {{bytes, path}} struct or a PIL image)")


def probe_image(ref: Any, root: str | os.PathLike | None = None) -> ImageInfo:
    """Size and format from the file header; the pixels are not decoded."""
    kind, value = _source(ref, root)
    if kind == "pil":
        return ImageInfo(value.width, value.height, value.format or "decoded")
    Image = _pil()
    try:
        with Image.open(io.BytesIO(value) if kind == "bytes" else value) as im:
            return ImageInfo(im.width, im.height, im.format or "unknown")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        where = "image bytes" if kind == "bytes" else str(value)
        raise ImageError(f"{where} cannot be read as an image: {type(exc).__name__}: {exc}") from None


def open_image(ref: Any, root: str | os.PathLike | None = None):
    """The decoded ``PIL.Image.Image`` (pixels loaded, no file left open)."""
    kind, value = _source(ref, root)
    if kind == "pil":
        return value
    Image = _pil()
    try:
        im = Image.open(io.BytesIO(value) if kind == "bytes" else value)
        im.load()  # a truncated or corrupt body fails here, not at the first use in an engine
        return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        where = "image bytes" if kind == "bytes" else str(value)
        raise ImageError(f"{where} cannot be decoded: {type(exc).__name__}: {exc}") from None


def image_bytes(ref: Any, root: str | os.PathLike | None = None) -> bytes:
    """The encoded bytes as stored (a PIL image is encoded as PNG, losslessly)."""
    kind, value = _source(ref, root)
    if kind == "bytes":
        return value
    if kind == "path":
        return value.read_bytes()
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return buffer.getvalue()


MAX_ASPECT_RATIO = 200.0
"""The longest side over the shortest that Qwen2/2.5/3-VL's image processors accept (their
``smart_resize`` raises above it): an image past it would fail the request that carries it."""


def model_image_problem(image: Any, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> str:
    """Why an image a tool returned cannot be shown to the model ('' when it can): not a decoded
    image, a side of 0 px, an aspect ratio the processor refuses, or pixels that do not decode.
    Checked where a tool's result enters the episode, so a bad image is the tool's error
    observation, never a failed request (or a batch whose image tokens miss their features)."""
    if not isinstance(image, _pil().Image):
        return f"a {type(image).__name__}, not an image"
    w, h = image.size
    if w < 1 or h < 1:
        return f"{w}x{h} px: an image needs at least one pixel per side"
    if max(w, h) / min(w, h) > max_aspect_ratio:
        return f"{w}x{h} px: aspect ratio {max(w, h) / min(w, h):.0f}, above the {max_aspect_ratio:g} the model's processor takes"
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unusable
        return f"{w}x{h} px that do not decode ({type(exc).__name__}: {str(exc)[:120]})"
    return ""

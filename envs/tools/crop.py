"""The crop / zoom-in tool: cut a box out of one of the episode's images and hand it back.

Why a tool at all: Qwen-VL models see an image at a fixed token budget; cropping the region that
matters and showing it again (optionally upscaled) is the cheapest way to "look closer".

Arguments the model writes (JSON)::

    {"image_index": 0, "bbox": [x1, y1, x2, y2]}

``image_index`` counts the task's images first, then every image earlier tool calls returned
(:attr:`ToolContext.images`); it defaults to 0. ``bbox`` may also be spelled ``bbox_2d`` (Qwen's
grounding key). Coordinate conventions (config ``coordinates``):

* ``"relative_1000"`` (default; Qwen3-VL): every value lies in 0..1000 and is scaled by the image
  side (``x * width / 1000``), whatever the image resolution.
* ``"absolute"`` (Qwen2.5-VL): pixels of the image as the model saw it (the processed image, i.e.
  the image stored in the context; resize before the episode if the processor resizes).

Then, in this order: values beyond the image are clamped to it; a side shorter than ``min_side``
(default 28 px, like DeepEyes' ``ImageZoomInTool``) is grown around the box centre (shifted to stay
inside the image); a box whose long/short side ratio exceeds ``max_aspect_ratio`` (default 100)
gets its short side grown the same way; with ``upscale_min_side`` set (default off) a crop whose
short side is smaller is resized up to it (bicubic, capped at ``max_output_pixels``).

Bad input never raises: NaN, inf, negative, inverted or empty boxes, non-numbers, booleans, a wrong
number of values, an index out of range, or an image too large to decode all come back as an error
observation that names the bad value.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from PIL import Image

from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult

__all__ = ["CropTool", "CropConfig", "BoxError", "resolve_box"]

COORDINATE_SYSTEMS = ("relative_1000", "absolute")


class BoxError(ValueError):
    """A box or index the model wrote cannot be used; the message is shown to the model."""


@dataclass(frozen=True)
class CropConfig:
    """Every knob of the crop tool (``CropTool(**config)`` keys)."""

    coordinates: str = "relative_1000"
    min_side: int = 28
    max_aspect_ratio: float = 100.0
    upscale_min_side: int | None = None
    max_output_pixels: int = 4096 * 4096
    max_input_pixels: int = 100_000_000
    """Images in the context larger than this are refused (decompression bombs) instead of decoded."""

    def __post_init__(self) -> None:
        if self.coordinates not in COORDINATE_SYSTEMS:
            raise ValueError(f"coordinates={self.coordinates!r}: expected one of {COORDINATE_SYSTEMS}")
        if not (isinstance(self.min_side, int) and self.min_side >= 1):
            raise ValueError(f"min_side={self.min_side!r}: expected an int >= 1")
        if not (self.max_aspect_ratio >= 1):
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio!r}: expected a number >= 1")
        if self.upscale_min_side is not None and not (isinstance(self.upscale_min_side, int) and self.upscale_min_side >= 1):
            raise ValueError(f"upscale_min_side={self.upscale_min_side!r}: expected None or an int >= 1")


def _is_number(value: Any) -> bool:
    # bool is an int subclass: `true` in a box is a model bug, not the value 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_index(value: Any, n_images: int) -> int:
    """The image index as an int in ``[0, n_images)``; integral floats (``1.0``) are accepted."""
    if not _is_number(value) or not math.isfinite(value) or value != int(value):
        raise BoxError(f"image_index={value!r} is not an integer")
    index = int(value)
    if n_images == 0:
        raise BoxError("there is no image to crop (the episode has no images)")
    if not 0 <= index < n_images:
        raise BoxError(f"image_index={index} is out of range: valid indices are 0..{n_images - 1}")
    return index


def parse_box(value: Any) -> tuple[float, float, float, float]:
    """Four finite, non-negative numbers with x1 < x2 and y1 < y2, as written by the model."""
    if not isinstance(value, (list, tuple)):
        raise BoxError(f"bbox={_short(value)} is not a list [x1, y1, x2, y2]")
    if len(value) != 4:
        raise BoxError(f"bbox={_short(value)} has {len(value)} values, expected 4: [x1, y1, x2, y2]")
    for name, v in zip(("x1", "y1", "x2", "y2"), value):
        if not _is_number(v):
            raise BoxError(f"bbox {name}={_short(v)} is not a number")
        if not math.isfinite(v):
            raise BoxError(f"bbox {name}={v!r} is not finite")
        if v < 0:
            raise BoxError(f"bbox {name}={v!r} is negative")
    x1, y1, x2, y2 = (float(v) for v in value)
    if x2 <= x1 or y2 <= y1:
        raise BoxError(f"bbox={list(value)} is empty or inverted: expected x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, target: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to ``target`` length around its centre, shifted to stay in ``[0, limit)``."""
    target = min(target, limit)
    if hi - lo >= target:
        return lo, hi
    centre = (lo + hi) / 2
    lo = int(round(centre - target / 2))
    lo = min(max(lo, 0), limit - target)
    return lo, lo + target


def resolve_box(box: tuple[float, float, float, float], size: tuple[int, int], config: CropConfig) -> tuple[int, int, int, int]:
    """Pixel box ``(left, top, right, bottom)`` inside an image of ``size`` = (width, height)."""
    width, height = size
    x1, y1, x2, y2 = box
    if config.coordinates == "relative_1000":
        x1, x2 = x1 * width / 1000, x2 * width / 1000
        y1, y2 = y1 * height / 1000, y2 * height / 1000
    left, top = int(math.floor(min(x1, width))), int(math.floor(min(y1, height)))
    right, bottom = int(math.ceil(min(x2, width))), int(math.ceil(min(y2, height)))
    if right <= left or bottom <= top:
        raise BoxError(f"bbox={list(box)} lies outside the {width}x{height} image ({config.coordinates} coordinates)")
    left, right = _grow(left, right, config.min_side, width)
    top, bottom = _grow(top, bottom, config.min_side, height)
    w, h = right - left, bottom - top
    if max(w, h) / min(w, h) > config.max_aspect_ratio:
        if w < h:
            left, right = _grow(left, right, math.ceil(h / config.max_aspect_ratio), width)
        else:
            top, bottom = _grow(top, bottom, math.ceil(w / config.max_aspect_ratio), height)
        w, h = right - left, bottom - top
        if max(w, h) / min(w, h) > config.max_aspect_ratio:
            raise BoxError(
                f"bbox={list(box)} gives a {w}x{h} crop, aspect ratio above {config.max_aspect_ratio:g} "
                f"even after growing it inside the {width}x{height} image"
            )
    return left, top, right, bottom


def _upscale(crop: Image.Image, config: CropConfig) -> Image.Image:
    """Resize so the short side reaches ``upscale_min_side`` (never above ``max_output_pixels``)."""
    if config.upscale_min_side is None:
        return crop
    w, h = crop.size
    scale = config.upscale_min_side / min(w, h)
    scale = min(scale, math.sqrt(config.max_output_pixels / (w * h)))
    if scale <= 1:
        return crop
    # floor, so that the product never exceeds max_output_pixels
    return crop.resize((max(1, math.floor(w * scale)), max(1, math.floor(h * scale))), Image.BICUBIC)


def _short(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters: a model may write megabytes into one argument."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CropTool(Tool):
    """Crop (zoom into) a box of an image; see the module docstring for the conventions."""

    name = "crop"
    description = (
        "Crop a region of an image to look at it more closely. The crop is returned as a new image "
        "appended after the existing ones."
    )
    parameters = {
        "type": "object",
        "properties": {
            "image_index": {
                "type": "integer",
                "description": "Which image: 0 is the first task image; images returned by tools follow in order.",
                "default": 0,
            },
            "bbox": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 4,
                "maxItems": 4,
                "description": "The region [x1, y1, x2, y2] (top-left, bottom-right corner).",
            },
        },
        "required": ["bbox"],
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.crop_config = CropConfig(**config)
        if self.crop_config.coordinates == "relative_1000":
            self.parameters = _with_bbox_description(self.parameters, "Coordinates are relative, 0-1000 on each axis.")
        else:
            self.parameters = _with_bbox_description(self.parameters, "Coordinates are pixels of the image.")

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        return self.crop(arguments, context)

    def crop(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Synchronous body of :meth:`call` (cheap: a few ms on a 4K image)."""
        config = self.crop_config
        try:
            if not isinstance(arguments, dict):
                raise BoxError(f"arguments={_short(arguments)} is not a JSON object")
            unknown = set(arguments) - {"image_index", "bbox", "bbox_2d"}
            if unknown:
                raise BoxError(f"unknown argument(s) {sorted(map(str, unknown))}: expected image_index and bbox")
            if "bbox" not in arguments and "bbox_2d" not in arguments:
                raise BoxError("missing argument bbox=[x1, y1, x2, y2]")
            box = parse_box(arguments.get("bbox", arguments.get("bbox_2d")))
            index = parse_index(arguments.get("image_index", 0), len(context.images))
            image = context.images[index]
            if not isinstance(image, Image.Image):
                raise BoxError(f"image {index} is not an image (got {type(image).__name__})")
            width, height = image.size
            if width * height > config.max_input_pixels:
                raise BoxError(f"image {index} has {width}x{height} pixels, more than the {config.max_input_pixels} allowed")
            pixel_box = resolve_box(box, image.size, config)
            crop = _upscale(image.crop(pixel_box), config)
        except BoxError as exc:
            return ToolResult.fail(str(exc), tool=self.name)
        except (OSError, Image.DecompressionBombError, ValueError, MemoryError) as exc:
            # A lazily opened, truncated or bomb image in the context fails on first pixel access.
            return ToolResult.fail(f"image could not be decoded: {type(exc).__name__}: {_short(str(exc), 200)}", tool=self.name)
        new_index = len(context.images)
        text = (
            f"Cropped image {index} at pixels {list(pixel_box)} of {width}x{height}; "
            f"the crop ({crop.width}x{crop.height}) is image {new_index}."
        )
        return ToolResult(text=text, images=(crop,), metadata={"tool": self.name, "pixel_box": pixel_box})


def _with_bbox_description(parameters: dict, note: str) -> dict:
    """A copy of the schema whose bbox description states the coordinate convention in force."""
    properties = dict(parameters["properties"])
    bbox = dict(properties["bbox"])
    bbox["description"] = f"{bbox['description']} {note}"
    properties["bbox"] = bbox
    return {**parameters, "properties": properties}

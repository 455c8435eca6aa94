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

A box is read the way Qwen-VL's own grounding utilities read model boxes (the Qwen2.5-VL /
Qwen3-VL cookbooks' ``plot_bounding_boxes``: scale, then swap corners written in the wrong order)
and then clamped to the image the way verl's DeepEyes ``ImageZoomInTool`` does: in this order,
corners are put in order (``[x2, y2, x1, y1]`` is the same box); coordinates beyond the image --
negative, or past the right/bottom edge -- are clamped to it (a model box that runs off the image
is a box of the visible part, not a mistake); a side shorter than ``min_side`` (default 28 px,
like DeepEyes) is grown around the box centre (shifted to stay inside the image); a box whose
long/short side ratio exceeds ``max_aspect_ratio`` (default 100) gets its short side grown the same
way; with ``upscale_min_side`` set (default off) a crop whose short side is smaller is resized up
to it (bicubic, capped at ``max_output_pixels``). The observation says when a box was clamped or
reordered.

Coordinates are numbers: ints of any size (``10**400`` is clamped like ``5000``), finite floats, or
strings holding a plain decimal number (``"12"``, ``"-3.5"``, ``"1e3"``; arguments are sometimes
written that way). Errors -- an observation naming the bad value, never an exception -- are only:
NaN or infinite values, booleans, ``None`` and other non-numbers (strings included that are not a
number), a wrong number of values, a box with no area (``x1 == x2`` or ``y1 == y2``), a box that
does not overlap the image at all, an index out of range, an aspect ratio that cannot be fixed inside
the image, or an image too large to decode.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from decimal import Decimal
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


def _is_finite(value: numbers.Real) -> bool:
    if isinstance(value, numbers.Integral):
        return True  # any int is finite (math.isfinite(10**400) would raise OverflowError)
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError, ValueError):  # an exotic Real: Fraction with a huge numerator
        return not (value != value)


def parse_index(value: Any, n_images: int) -> int:
    """The image index as an int in ``[0, n_images)``; integral floats (``1.0``) are accepted."""
    if not _is_number(value) or not _is_finite(value) or value != math.floor(value):
        raise BoxError(f"image_index={_short(value)} is not an integer")
    index = int(value)
    if n_images == 0:
        raise BoxError("there is no image to crop (the episode has no images)")
    if not 0 <= index < n_images:
        raise BoxError(f"image_index={_short(index)} is out of range: valid indices are 0..{n_images - 1}")
    return index


_NUMBER_TEXT = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,6})?\s*")
"""A coordinate written as a string: a plain decimal number (no hex, no underscores, no nan/inf)."""

Coordinate = Any  # int | float | Decimal: exact comparisons with any of them are safe, arithmetic is not
BOX_KEYS = ("x1", "y1", "x2", "y2")


def _coordinate(name: str, v: Any) -> Coordinate:
    if isinstance(v, str):
        if not _NUMBER_TEXT.fullmatch(v):  # linear; Decimal parses millions of digits in milliseconds
            raise BoxError(f"bbox {name}={_short(v)} is not a number")
        return Decimal(v.strip())  # exact, and no overflow at 1e999
    if not _is_number(v):
        raise BoxError(f"bbox {name}={_short(v)} is not a number")
    if not _is_finite(v):
        raise BoxError(f"bbox {name}={_short(v)} is not finite")
    return v


def parse_box(value: Any) -> tuple[Coordinate, Coordinate, Coordinate, Coordinate]:
    """Four finite numbers ``[x1, y1, x2, y2]`` as written by the model (any order, any size)."""
    if not isinstance(value, (list, tuple)):
        raise BoxError(f"bbox={_short(value)} is not a list [x1, y1, x2, y2]")
    if len(value) != 4:
        raise BoxError(f"bbox={_short(value)} has {len(value)} values, expected 4: [x1, y1, x2, y2]")
    return tuple(_coordinate(name, v) for name, v in zip(BOX_KEYS, value))


def _clamp(value: Coordinate, limit: int) -> float:
    """``value`` clamped to ``[0, limit]`` (compared exactly, converted only once inside)."""
    if value <= 0:
        return 0.0
    if value >= limit:
        return float(limit)
    return float(value)


def _grow(lo: int, hi: int, target: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to ``target`` length around its centre, shifted to stay in ``[0, limit)``."""
    target = min(target, limit)
    if hi - lo >= target:
        return lo, hi
    centre = (lo + hi) / 2
    lo = int(round(centre - target / 2))
    lo = min(max(lo, 0), limit - target)
    return lo, lo + target


def resolve_box(box: tuple, size: tuple[int, int], config: CropConfig) -> tuple[int, int, int, int]:
    """Pixel box ``(left, top, right, bottom)`` inside an image of ``size`` = (width, height).

    ``box`` is what :func:`parse_box` returns: corners in any order, values of any size.
    """
    return _resolve(box, size, config)[0]


def _resolve(box: tuple, size: tuple[int, int], config: CropConfig) -> tuple[tuple[int, int, int, int], dict]:
    """:func:`resolve_box` plus what was done to the box (``reordered``, ``clamped``)."""
    width, height = size
    x1, y1, x2, y2 = box
    shown = "[" + ", ".join(_short(v, 24) for v in box) + "]"
    reordered = x1 > x2 or y1 > y2
    x1, x2 = (x2, x1) if x1 > x2 else (x1, x2)
    y1, y2 = (y2, y1) if y1 > y2 else (y1, y2)
    if x1 == x2 or y1 == y2:
        raise BoxError(f"bbox={shown} is empty: it has no {'width' if x1 == x2 else 'height'} (expected x1 != x2 and y1 != y2)")
    relative = config.coordinates == "relative_1000"
    limit_x, limit_y = (1000, 1000) if relative else (width, height)
    cx1, cx2, cy1, cy2 = _clamp(x1, limit_x), _clamp(x2, limit_x), _clamp(y1, limit_y), _clamp(y2, limit_y)
    if cx2 <= cx1 or cy2 <= cy1:
        raise BoxError(
            f"bbox={shown} lies outside the {width}x{height} image ({config.coordinates} coordinates: "
            f"x in 0..{limit_x}, y in 0..{limit_y})"
        )
    clamped = any(v < 0 or v > limit for v, limit in ((x1, limit_x), (x2, limit_x), (y1, limit_y), (y2, limit_y)))
    if relative:
        cx1, cx2 = cx1 * width / 1000, cx2 * width / 1000
        cy1, cy2 = cy1 * height / 1000, cy2 * height / 1000
    left, top = min(int(math.floor(cx1)), width - 1), min(int(math.floor(cy1)), height - 1)
    right, bottom = max(int(math.ceil(cx2)), left + 1), max(int(math.ceil(cy2)), top + 1)
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
                f"bbox={shown} gives a {w}x{h} crop, aspect ratio above {config.max_aspect_ratio:g} "
                f"even after growing it inside the {width}x{height} image"
            )
    return (left, top, right, bottom), {"reordered": reordered, "clamped": clamped}


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
    if isinstance(value, Decimal):
        text = str(value)  # as the model wrote it, without Decimal('...')
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 512:
        # repr() of a huge int is slow and, past 4300 digits, refused (ValueError).
        text = f"{'-' if value < 0 else ''}<{int(value.bit_length() * 0.30103) + 1}-digit integer>"
    else:
        try:
            text = repr(value)
        except Exception:  # noqa: BLE001 - a value whose repr fails is still named by its type
            text = f"<{type(value).__name__}>"
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
            pixel_box, adjusted = _resolve(box, image.size, config)
            crop = _upscale(image.crop(pixel_box), config)
        except BoxError as exc:
            return ToolResult.fail(str(exc), tool=self.name)
        except (OSError, Image.DecompressionBombError, ValueError, MemoryError) as exc:
            # A lazily opened, truncated or bomb image in the context fails on first pixel access.
            return ToolResult.fail(f"image could not be decoded: {type(exc).__name__}: {_short(str(exc), 200)}", tool=self.name)
        except Exception as exc:  # noqa: BLE001 - a tool never raises for model input (base.Tool.call)
            return ToolResult.fail(f"crop failed: {type(exc).__name__}: {_short(str(exc), 200)}", tool=self.name)
        new_index = len(context.images)
        notes = [n for n, done in (("corners reordered", adjusted["reordered"]), ("clamped to the image", adjusted["clamped"])) if done]
        text = (
            f"Cropped image {index} at pixels {list(pixel_box)} of {width}x{height}"
            f"{' (box ' + ' and '.join(notes) + ')' if notes else ''}; "
            f"the crop ({crop.width}x{crop.height}) is image {new_index}."
        )
        return ToolResult(text=text, images=(crop,), metadata={"tool": self.name, "pixel_box": pixel_box, **adjusted})


def _with_bbox_description(parameters: dict, note: str) -> dict:
    """A copy of the schema whose bbox description states the coordinate convention in force."""
    properties = dict(parameters["properties"])
    bbox = dict(properties["bbox"])
    bbox["description"] = f"{bbox['description']} {note}"
    properties["bbox"] = bbox
    return {**parameters, "properties": properties}

"""Fuzz the tools (hypothesis): more than 10,000 calls through crop and the call_tool dispatcher
with any JSON, wrong types, unknown names, huge strings and decompression-bomb images. Every call
must come back as a ToolResult; none may raise. The python tool gets a few hundred argument shapes
(most refused before any worker starts; a few run for real)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import warnings
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from axpo_rllm.envs.tools.base import ToolContext, ToolResult
from axpo_rllm.envs.tools.crop import CropTool
from axpo_rllm.envs.tools.python_code import PythonCodeTool
from axpo_rllm.envs.tools.registry import call_tool

CALLS = {"n": 0}


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(width: int, height: int) -> bytes:
    """A few hundred bytes that declare a ``width`` x ``height`` canvas (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def lazy_open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


IMAGES = (
    Image.new("RGB", (64, 48), "red"),
    Image.new("L", (1, 1)),
    Image.new("RGBA", (300, 7)),
    Image.new("RGB", (640, 360), "gray"),  # (4K speed is test_crop's job)
    lazy_open(header_only_png(11000, 11000)),  # 121 Mpx: over max_input_pixels, never decoded
    lazy_open(header_only_png(500, 400)),  # truncated pixel data: fails on first access
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=20)
numbers = st.one_of(
    st.integers(min_value=-5, max_value=5000), st.floats(min_value=-10, max_value=5000),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=5),
)
boxes = st.one_of(st.lists(numbers, min_size=4, max_size=4), st.lists(numbers, max_size=7), json_values)
indices = st.one_of(st.integers(min_value=-3, max_value=8), st.floats(allow_nan=True), json_scalars)
crop_arguments = st.one_of(
    st.fixed_dictionaries({"bbox": boxes}, optional={"image_index": indices}),
    st.fixed_dictionaries({"bbox_2d": boxes, "image_index": indices}),
    st.dictionaries(st.text(max_size=12), json_values, max_size=4),
    json_values,
)
image_sets = st.lists(st.sampled_from(IMAGES), max_size=4).map(tuple)
CROP_CONFIGS = [
    {}, {"coordinates": "absolute"}, {"upscale_min_side": 256, "max_output_pixels": 512 * 512}, {"min_side": 1, "max_aspect_ratio": 2.0},
    {"coordinates": "absolute", "min_side": 500, "max_input_pixels": 50_000_000},
]
TOOLS = {}


def crop_tool(config: dict) -> CropTool:
    key = json.dumps(config, sort_keys=True)
    if key not in TOOLS:
        TOOLS[key] = CropTool(**config)
    return TOOLS[key]


def check_crop_result(result: ToolResult, tool: CropTool, images: tuple) -> None:
    CALLS["n"] += 1
    assert isinstance(result, ToolResult)
    if result.is_error:
        assert not result.images and result.error and len(result.error) < 500
        return
    (crop,) = result.images
    config = tool.crop_config
    w, h = crop.size
    assert w >= 1 and h >= 1 and w * h <= max(config.max_output_pixels, 640 * 360)
    if config.upscale_min_side is None:
        assert max(w, h) / min(w, h) <= config.max_aspect_ratio or min(w, h) < config.min_side


def all_crop_tools() -> list[CropTool]:
    """One tool per config: each drawn input is tried under every convention (cheap calls, costly draws)."""
    return [crop_tool(c) for c in CROP_CONFIGS]


@fuzz(1200)
@given(arguments=crop_arguments, images=image_sets)
def test_fuzz_crop_arguments(arguments, images):
    for tool in all_crop_tools():
        check_crop_result(tool.crop(arguments, ToolContext(images=images)), tool, images)


@fuzz(300)
@given(box=st.lists(st.floats(min_value=0, max_value=1200, allow_nan=False), min_size=4, max_size=4))
def test_fuzz_crop_valid_looking_boxes(box):
    images = IMAGES[:3]
    for tool in all_crop_tools():
        for index in range(len(images)):
            result = tool.crop({"bbox": box, "image_index": index}, ToolContext(images=images))
            check_crop_result(result, tool, images)
            if not result.is_error:
                left, top, right, bottom = result.metadata["pixel_box"]
                width, height = images[index].size
                assert 0 <= left < right <= width and 0 <= top < bottom <= height
            else:  # only a box without area, without overlap, or with an unfixable aspect ratio is refused
                x1, y1, x2, y2 = box
                width, height = (1000, 1000) if tool.crop_config.coordinates == "relative_1000" else images[index].size
                if "is empty" in result.error:
                    assert x1 == x2 or y1 == y2, result.error
                elif "lies outside" in result.error:
                    assert min(x1, x2) >= width or min(y1, y2) >= height, result.error
                else:
                    assert "aspect ratio" in result.error, result.error


class _FakePool:
    """Stands in for the sandbox when fuzzing the dispatcher: argument shapes, not code, are tested."""

    async def arun(self, code, images):
        from axpo_rllm.envs.tools.sandbox import SandboxResult

        return SandboxResult(stdout=f"ran {len(code)} chars", isolation="fake")


class DryPythonTool(PythonCodeTool):
    @property
    def pool(self):
        return _FakePool()


DISPATCH_TOOLS = {"crop": CropTool(), "python": DryPythonTool()}
names = st.one_of(st.sampled_from(["crop", "python", "Crop", "crop ", "", "zoom_in", "search"]), json_scalars,
                  st.text(max_size=50), st.lists(st.text(max_size=3), max_size=2))
huge = st.integers(min_value=1, max_value=3).map(lambda k: "9" * (k * 400_000))
argument_payloads = st.one_of(
    crop_arguments,
    crop_arguments.map(lambda a: json.dumps(a, allow_nan=True)),
    crop_arguments.map(lambda a: json.dumps(json.dumps(a, allow_nan=True))),
    st.fixed_dictionaries({"code": json_values}),
    st.text(max_size=200), st.binary(max_size=50), huge, huge.map(lambda s: '{"bbox": [' + s + "]}"),
    st.just("[" * 50_000), st.just('{"bbox": ' + "[" * 5000 + "]" * 5000 + "}"),
)


@fuzz(800)
@given(name=names, arguments=argument_payloads, images=image_sets)
def test_fuzz_dispatcher(name, arguments, images):
    result = asyncio.run(call_tool(DISPATCH_TOOLS, name, arguments, ToolContext(images=images)))
    CALLS["n"] += 1
    assert isinstance(result, ToolResult)
    assert result.is_error or result.images or result.text
    if result.is_error:
        assert len(result.error) < 2000


SNIPPETS = ["print(1 + 1)", "print(images[0].size if images else None)", "display(Image.new('RGB', (4, 4)))", "1/0", "import os\nos._exit(1)"]
code_shapes = st.one_of(
    st.fixed_dictionaries({"code": st.sampled_from(SNIPPETS)}),
    st.fixed_dictionaries({"code": json_values}),
    st.fixed_dictionaries({"code": st.sampled_from(["", "  \n", "x" * 25_000, "a\x00b"])}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    st.fixed_dictionaries({"code": st.sampled_from(SNIPPETS), "timeout": json_scalars}),
)


@pytest.fixture(scope="module")
def python_tool():
    tool = PythonCodeTool(timeout_s=3, pool_size=2, memory_mb=512)
    yield tool
    asyncio.run(tool.aclose())


@fuzz(300)
@given(arguments=st.one_of(code_shapes, code_shapes.map(json.dumps)))
def test_fuzz_python_tool_argument_shapes(python_tool, arguments):
    result = asyncio.run(call_tool({"python": python_tool}, "python", arguments, ToolContext(images=IMAGES[:1])))
    CALLS["n"] += 1
    assert isinstance(result, ToolResult)
    assert result.is_error or result.text
    if result.metadata.get("isolation"):
        assert result.metadata["isolation"] in ("bwrap", "unshare", "rlimits")


def test_zz_more_than_10000_calls_were_fuzzed():
    assert CALLS["n"] >= 10_000, CALLS
    assert not math.isnan(CALLS["n"])

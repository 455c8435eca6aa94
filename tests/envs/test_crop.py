"""The crop tool: both coordinate conventions, clamping (Qwen-VL's reading of model boxes: corners
in any order, boxes running off the image clamped to it), minimum side, aspect ratio, upscaling,
every kind of bad box answered with an error that names the bad value, and its speed on 4K."""

from __future__ import annotations

import asyncio
import io
import math
import re
import statistics
import time
import warnings
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from axpo_rllm.envs.tools.base import ToolContext
from axpo_rllm.envs.tools.crop import CropConfig, CropTool, resolve_box


def gradient(width: int, height: int) -> Image.Image:
    """An image whose pixel at (x, y) encodes x and y, so a crop's origin can be read back."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x % 256, y % 256, 0) for y in range(height) for x in range(width)])
    return image


def call(tool: CropTool, arguments, images):
    return asyncio.run(tool.call(arguments, ToolContext(images=tuple(images))))


@pytest.fixture(scope="module")
def image():
    return gradient(200, 100)


def test_relative_1000_is_the_default_and_scales_by_image_side(image):
    result = call(CropTool(), {"bbox": [100, 200, 600, 700]}, [image])
    assert not result.is_error, result.error
    crop = result.images[0]
    assert crop.size == (100, 50)  # x 20..120 of 200, y 20..70 of 100
    assert crop.getpixel((0, 0)) == (20, 20, 0)
    assert "image 1" in result.text and result.metadata["pixel_box"] == (20, 20, 120, 70)


def test_absolute_pixels(image):
    result = call(CropTool(coordinates="absolute"), {"image_index": 0, "bbox": [30, 10, 90, 60]}, [image])
    assert result.images[0].size == (60, 50)
    assert result.images[0].getpixel((0, 0)) == (30, 10, 0)


def test_index_counts_task_images_then_tool_outputs(image):
    second = Image.new("RGB", (50, 50), "blue")
    result = call(CropTool(coordinates="absolute"), {"image_index": 1, "bbox": [0, 0, 40, 40]}, [image, second])
    assert result.images[0].getpixel((5, 5)) == (0, 0, 255)
    assert "image 2" in result.text


def test_bbox_2d_alias_and_integral_float_index(image):
    result = call(CropTool(coordinates="absolute"), {"image_index": 0.0, "bbox_2d": [0, 0, 50, 50]}, [image])
    assert not result.is_error and result.images[0].size == (50, 50)


def test_box_beyond_the_image_is_clamped(image):
    result = call(CropTool(coordinates="absolute"), {"bbox": [150, 50, 5000, 9999]}, [image])
    assert result.metadata["pixel_box"] == (150, 50, 200, 100)
    assert result.metadata["clamped"] and "clamped to the image" in result.text


@pytest.mark.parametrize("box, expected", [([12.3, 0.1, 50.7, 60], (12, 0, 51, 60)), (["12.3", "0.1", "50.7", "60"], (12, 0, 51, 60)),
                                           ([0, 0, 200, 100], (0, 0, 200, 100))])
def test_a_box_inside_the_image_is_neither_clamped_nor_reordered(image, box, expected):
    result = call(CropTool(coordinates="absolute"), {"bbox": box}, [image])
    assert result.metadata["pixel_box"] == expected
    assert not result.metadata["clamped"] and not result.metadata["reordered"] and "(box" not in result.text


# Behaviour change (issue 10): negative coordinates and inverted corners used to be refused; a
# model box that runs off the image is now a box of its visible part, as Qwen-VL's tools read it.
@pytest.mark.parametrize(
    "coordinates, box, expected",
    [
        ("absolute", [-5, 0, 10, 10], (0, 0, 28, 28)),  # clamped, then grown to min_side
        ("absolute", [-50, -20, 100, 60], (0, 0, 100, 60)),
        ("absolute", [-1000, -1000, 5000, 5000], (0, 0, 200, 100)),
        ("absolute", [10**400, 10**400, 150, 50], (150, 50, 200, 100)),  # huge ints are numbers too
        ("absolute", [-(10**400), 0, 100, 10**400], (0, 0, 100, 100)),
        ("absolute", [120, 80, 40, 20], (40, 20, 120, 80)),  # corners in the wrong order
        ("absolute", [120, 20, 40, 80], (40, 20, 120, 80)),
        ("absolute", ["30", " 10 ", "90.0", "6e1"], (30, 10, 90, 60)),  # numbers written as strings
        ("absolute", [-1e308, 0, 1e308, 100], (0, 0, 200, 100)),
        ("relative_1000", [-100, -100, 500, 500], (0, 0, 100, 50)),
        ("relative_1000", [900, 900, 1500, 1200], (172, 72, 200, 100)),  # clamped to 1000, then min_side
        ("relative_1000", [500, 1000, 100, 0], (20, 0, 100, 100)),
    ],
)
def test_out_of_bounds_and_reordered_boxes_are_clamped(image, coordinates, box, expected):
    result = call(CropTool(coordinates=coordinates), {"bbox": box}, [image])
    assert not result.is_error, result.error
    assert result.metadata["pixel_box"] == expected
    left, top, right, bottom = expected
    assert result.images[0].size == (right - left, bottom - top)
    assert result.images[0].getpixel((0, 0)) == (left, top, 0)


def test_small_box_grows_around_its_centre_to_min_side(image):
    result = call(CropTool(coordinates="absolute"), {"bbox": [100, 50, 102, 52]}, [image])
    assert result.metadata["pixel_box"] == (87, 37, 115, 65)


def test_small_box_at_the_border_is_shifted_inside(image):
    result = call(CropTool(coordinates="absolute"), {"bbox": [0, 0, 2, 2]}, [image])
    assert result.metadata["pixel_box"] == (0, 0, 28, 28)


def test_min_side_never_exceeds_the_image():
    tiny = Image.new("RGB", (10, 10))
    result = call(CropTool(coordinates="absolute"), {"bbox": [2, 2, 4, 4]}, [tiny])
    assert result.images[0].size == (10, 10)


def test_aspect_ratio_is_capped_by_growing_the_short_side():
    wide = Image.new("RGB", (4000, 500))
    box = resolve_box((0, 0, 4000, 30), (4000, 500), CropConfig(coordinates="absolute", min_side=1, max_aspect_ratio=20))
    w, h = box[2] - box[0], box[3] - box[1]
    assert w / h <= 20 and h == 200
    assert call(CropTool(coordinates="absolute", min_side=1, max_aspect_ratio=20), {"bbox": [0, 0, 4000, 30]}, [wide]).images[0].size == (4000, 200)


def test_aspect_ratio_impossible_inside_a_thin_image_is_an_error():
    line = Image.new("RGB", (5000, 10))
    result = call(CropTool(coordinates="absolute", max_aspect_ratio=100), {"bbox": [0, 0, 5000, 10]}, [line])
    assert result.is_error and "aspect ratio" in result.error


def test_upscale_to_min_side_is_off_by_default_and_capped(image):
    args = {"bbox": [0, 0, 30, 30]}
    assert call(CropTool(coordinates="absolute"), args, [image]).images[0].size == (30, 30)
    up = call(CropTool(coordinates="absolute", upscale_min_side=300), args, [image]).images[0]
    assert up.size == (300, 300)
    capped = call(CropTool(coordinates="absolute", upscale_min_side=300, max_output_pixels=100 * 100), args, [image]).images[0]
    assert capped.size == (100, 100)


def test_schema_states_the_convention():
    assert "0-1000" in CropTool().schema()["function"]["parameters"]["properties"]["bbox"]["description"]
    assert "pixels" in CropTool(coordinates="absolute").schema()["function"]["parameters"]["properties"]["bbox"]["description"]
    assert "0-1000" not in CropTool.parameters["properties"]["bbox"]["description"]  # class schema untouched


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({"bbox": [float("nan"), 0, 10, 10]}, "x1=nan is not finite"),
        ({"bbox": [0, float("inf"), 10, 10]}, "y1=inf is not finite"),
        ({"bbox": [0, 0, float("-inf"), 10]}, "x2=-inf is not finite"),
        ({"bbox": [10, 0, 10, 10]}, "is empty: it has no width"),
        ({"bbox": [0, 10, 10, 10]}, "is empty: it has no height"),
        ({"bbox": [5000, 0, 5000.0, 10]}, "is empty"),  # no area, wherever it is
        ({"bbox": [0, 0, "ten", 10]}, "x2='ten' is not a number"),
        ({"bbox": [0, 0, "nan", 10]}, "x2='nan' is not a number"),
        ({"bbox": [0, "inf", 10, 10]}, "y1='inf' is not a number"),
        ({"bbox": [0, 0, "0x10", 10]}, "x2='0x10' is not a number"),
        ({"bbox": [0, 0, "1_000", 10]}, "x2='1_000' is not a number"),
        ({"bbox": [0, 0, "", 10]}, "x2='' is not a number"),
        ({"bbox": [0, 0, [10], 10]}, "x2=[10] is not a number"),
        ({"bbox": [[0, 0, 10, 10]]}, "has 1 values"),
        ({"bbox": [0, 0, None, 10]}, "x2=None is not a number"),
        ({"bbox": [True, 0, 10, 10]}, "x1=True is not a number"),
        ({"bbox": [0, 0, 10]}, "has 3 values"),
        ({"bbox": [0, 0, 10, 10, 10]}, "has 5 values"),
        ({"bbox": "0,0,10,10"}, "is not a list"),
        ({"bbox": {"x1": 0}}, "is not a list"),
        ({}, "missing argument bbox"),
        ({"bbox": [0, 0, 10, 10], "zoom": 2}, "unknown argument"),
        ({"bbox": [0, 0, 10, 10], "image_index": 7}, "image_index=7 is out of range"),
        ({"bbox": [0, 0, 10, 10], "image_index": -1}, "image_index=-1 is out of range"),
        ({"bbox": [0, 0, 10, 10], "image_index": True}, "image_index=True is not an integer"),
        ({"bbox": [0, 0, 10, 10], "image_index": 0.5}, "image_index=0.5 is not an integer"),
        ({"bbox": [0, 0, 10, 10], "image_index": "0"}, "image_index='0' is not an integer"),
        ({"bbox": [1001, 1001, 2000, 2000]}, "lies outside"),
        ({"bbox": [-50, -50, -10, -10]}, "lies outside"),
        ({"bbox": [1000, 0, 10**400, 500]}, "lies outside"),  # touches the right edge only
        ({"bbox": [0, 0, 10, 10], "image_index": 10**400}, "is out of range"),
        ({"bbox": [0, 0, 10, 10], "image_index": float("inf")}, "image_index=inf is not an integer"),
    ],
)
def test_bad_arguments_are_error_observations_naming_the_value(image, arguments, expected):
    result = call(CropTool(), arguments, [image])
    assert result.is_error and not result.images
    assert expected in result.error, result.error


def test_non_dict_arguments_and_no_images(image):
    assert "not a JSON object" in call(CropTool(), [1, 2], [image]).error
    assert "no image" in call(CropTool(), {"bbox": [0, 0, 10, 10]}, []).error
    assert "not an image" in call(CropTool(), {"bbox": [0, 0, 10, 10]}, ["path.png"]).error


def test_huge_value_in_the_error_is_shortened(image):
    result = call(CropTool(), {"bbox": ["x" * 100_000, 0, 1, 1]}, [image])
    assert result.is_error and len(result.error) < 300
    # Past 4300 digits Python refuses to repr() an int; the error still names the value.
    result = call(CropTool(), {"bbox": [10**5000, 10**5000, 10**6000, 10**6000]}, [image])
    assert result.is_error and "<5001-digit integer>" in result.error and len(result.error) < 300


def exact_pixel_box(box, size, coordinates):
    """What the tool must return for a box of ints with min_side=1 and no aspect-ratio cap, in exact arithmetic."""
    width, height = size
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    scale_x, scale_y = (width, height) if coordinates == "absolute" else (1000, 1000)
    cx1, cx2 = (min(max(v, 0), scale_x) for v in (x1, x2))
    cy1, cy2 = (min(max(v, 0), scale_y) for v in (y1, y2))
    if x1 == x2 or y1 == y2 or cx1 == cx2 or cy1 == cy2:
        return None
    if coordinates == "relative_1000":
        fx1, fx2 = Fraction(cx1 * width, 1000), Fraction(cx2 * width, 1000)
        fy1, fy2 = Fraction(cy1 * height, 1000), Fraction(cy2 * height, 1000)
    else:
        fx1, fx2, fy1, fy2 = cx1, cx2, cy1, cy2
    return math.floor(fx1), math.floor(fy1), math.ceil(fx2), math.ceil(fy2)


coordinate_ints = st.one_of(
    st.integers(min_value=-300, max_value=1300),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.sampled_from([0, 1, 999, 1000, 1001, -1, 199, 200, 201, 99, 100, 101]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(box=st.lists(coordinate_ints, min_size=4, max_size=4), coordinates=st.sampled_from(["absolute", "relative_1000"]),
       as_text=st.booleans())
def test_any_int_box_is_clamped_exactly_or_refused_for_no_overlap(image, box, coordinates, as_text):
    tool = CropTool(coordinates=coordinates, min_side=1, max_aspect_ratio=10**9)
    written = [str(v) if as_text and abs(v) < 10**40 else v for v in box]
    result = tool.crop({"bbox": written}, ToolContext(images=(image,)))
    expected = exact_pixel_box(box, image.size, coordinates)
    if expected is None:
        assert result.is_error and ("is empty" in result.error or "lies outside" in result.error), result.error
    else:
        assert not result.is_error, result.error
        assert result.metadata["pixel_box"] == expected
        assert result.metadata["clamped"] == any(v < 0 or v > (1000 if coordinates == "relative_1000" else lim)
                                                 for v, lim in zip(box, (200, 100, 200, 100)))


finite = st.floats(allow_nan=False, allow_infinity=False)
any_number = st.one_of(finite, st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
                       finite.map(repr), st.integers().map(str))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(box=st.lists(any_number, min_size=4, max_size=4), coordinates=st.sampled_from(["absolute", "relative_1000"]))
def test_any_number_box_gives_a_crop_inside_the_image_or_names_why_not(image, box, coordinates):
    result = CropTool(coordinates=coordinates).crop({"bbox": box}, ToolContext(images=(image,)))
    if result.is_error:
        assert not result.images and ("is empty" in result.error or "lies outside" in result.error), result.error
        return
    left, top, right, bottom = result.metadata["pixel_box"]
    assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
    assert result.images[0].size == (right - left, bottom - top)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")), st.booleans(), st.none(),
                     st.text(max_size=8).filter(lambda t: not re.fullmatch(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*", t)),
                     st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)),
       position=st.integers(min_value=0, max_value=3))
def test_a_value_that_is_not_a_number_is_named_in_the_error(image, bad, position):
    box = [10, 10, 500, 500]
    box[position] = bad
    result = CropTool().crop({"bbox": box}, ToolContext(images=(image,)))
    name = ("x1", "y1", "x2", "y2")[position]
    assert result.is_error and f"bbox {name}=" in result.error and ("not a number" in result.error or "not finite" in result.error)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file that declares a huge canvas (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_decompression_bomb_in_the_context_is_refused_without_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        lazily_opened = Image.open(io.BytesIO(bomb_png(12000, 12000)))  # 144 Mpx, header only
    result = call(CropTool(max_input_pixels=50_000_000), {"bbox": [0, 0, 10, 10]}, [lazily_opened])
    assert result.is_error and "12000x12000" in result.error


def test_truncated_lazily_opened_image_is_an_error_observation():
    data = bomb_png(300, 300)
    broken = Image.open(io.BytesIO(data[: len(data) // 2]))
    result = call(CropTool(), {"bbox": [0, 0, 500, 500]}, [broken])
    assert result.is_error and "could not be decoded" in result.error


def test_config_is_validated():
    with pytest.raises(ValueError, match="coordinates='pixels'"):
        CropTool(coordinates="pixels")
    with pytest.raises(ValueError, match="min_side=0"):
        CropTool(min_side=0)


def test_p50_under_5ms_on_a_4k_image():
    image = Image.new("RGB", (3840, 2160), "gray")
    tool = CropTool()
    context = ToolContext(images=(image,))
    times = []
    for i in range(60):
        box = [100 + i, 100, 600 + i, 700]  # a typical zoom: a quarter of each side
        start = time.perf_counter()
        result = tool.crop({"bbox": box}, context)
        times.append(time.perf_counter() - start)
        assert not result.is_error
    p50 = statistics.median(times) * 1000
    assert p50 <= 5.0, f"crop p50 {p50:.2f} ms on 4K"
    assert not math.isnan(p50)

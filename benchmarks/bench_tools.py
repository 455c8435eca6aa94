"""Tool latency, side by side in one run: crop on a 4K image, and the python tool's warm sandbox
pool against a cold ``python -c`` subprocess per call (the naive way, with no isolation at all).

    .venv/bin/python benchmarks/bench_tools.py [--calls 40] [--crops 300]

Targets: crop p50 <= 5 ms on 3840x2160; python tool warm p50 <= 50 ms. "warm" = a ready worker
is waiting when the call arrives (the pool refills between calls, as it does while the policy
generates); "back-to-back" = calls with no gap, where starting replacement workers (~0.2-0.5 s
of CPU each) becomes the bottleneck. The load average is printed: on a shared machine, compare
only numbers from one run.

Measured 2026-11-25 (2-core CPU VM shared with other jobs, bwrap layer, root, 448x448 image,
60 calls per python row, ms):

    load avg   crop p50/p99   warm p50/p99   back-to-back p50/p99   cold python -c p50/p99   ratio
    5.8        0.79 / 14.7    18.2 / 38.2    684 / 2743             398 / 768                21.9x
    10.7       0.57 / 11.1    26.0 / 1027    800 / 2232             971 / 3260               37.3x
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image

from axpo_rllm.envs.tools.base import ToolContext
from axpo_rllm.envs.tools.crop import CropTool
from axpo_rllm.envs.tools.python_code import PythonCodeTool
from axpo_rllm.envs.tools.sandbox import detect_isolation

CODE = "import numpy as np\na = np.asarray(images[0])\nprint(a.shape, round(float(a.mean()), 2))"


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]


def bench_crop(n: int) -> list[float]:
    """Random zoom boxes (1/16 to 1/2 of each side) on a 4K photo-sized image."""
    rng = random.Random(0)
    image = Image.effect_noise((3840, 2160), 40).convert("RGB")
    tool, context = CropTool(), ToolContext(images=(image,))
    times = []
    for _ in range(n):
        w, h = rng.uniform(62, 500), rng.uniform(62, 500)
        x, y = rng.uniform(0, 1000 - w), rng.uniform(0, 1000 - h)
        start = time.perf_counter()
        result = tool.crop({"bbox": [x, y, x + w, y + h]}, context)
        times.append(time.perf_counter() - start)
        assert not result.is_error, result.error
    return times


def wait_for_ready(tool: PythonCodeTool) -> None:
    pool = tool.pool
    while pool._ready.qsize() < pool.size:
        time.sleep(0.005)
    time.sleep(0.05)  # let the reaper finish the previous worker (policy generation runs here in RL)


def bench_warm(n: int, image: Image.Image, back_to_back: bool) -> tuple[list[float], str]:
    tool = PythonCodeTool(pool_size=2)
    context = ToolContext(images=(image,))
    times, isolation = [], ""
    try:
        for _ in range(n):
            if not back_to_back:
                wait_for_ready(tool)
            start = time.perf_counter()
            result = asyncio.run(tool.call({"code": CODE}, context))
            times.append(time.perf_counter() - start)
            assert not result.is_error, result.error
            isolation = result.metadata["isolation"]
    finally:
        asyncio.run(tool.aclose())
    return times, isolation


def bench_cold(n: int, image: Image.Image) -> list[float]:
    """``python -c`` per call doing the same work: start, import PIL + numpy, load the image, run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image_0.png")
        image.save(path)
        code = f"from PIL import Image\nimages = [Image.open({path!r})]\n{CODE}"
        times = []
        for _ in range(n):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=tmp)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--image-side", type=int, default=448, help="side of the square image given to the python tool")
    args = parser.parse_args()

    isolation = detect_isolation()
    image = Image.effect_noise((args.image_side, args.image_side), 40).convert("RGB")
    crop = percentiles(bench_crop(args.crops))
    warm_times, level = bench_warm(args.calls, image, back_to_back=False)
    warm = percentiles(warm_times)
    b2b = percentiles(bench_warm(args.calls, image, back_to_back=True)[0])
    cold = percentiles(bench_cold(args.calls, image))

    print(f"isolation: {level} ({isolation.detail}); private uid per worker: {isolation.own_uid}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':38s} {'p50 ms':>9s} {'p99 ms':>9s}")
    print(f"{'crop, 4K (3840x2160), ' + str(args.crops) + ' calls':38s} {crop[0]:9.2f} {crop[1]:9.2f}   target p50 <= 5")
    rows = [
        (f"python tool, warm pool ({level})", warm),
        (f"python tool, back-to-back ({level})", b2b),
        ("cold `python -c` per call (no sandbox)", cold),
    ]
    for name, (p50, p99) in rows:
        print(f"{name:38s} {p50:9.2f} {p99:9.2f}" + ("   target p50 <= 50" if "warm" in name else ""))
    print(f"cold / warm p50 ratio: {cold[0] / warm[0]:.1f}x  ({args.calls} calls each, {args.image_side}x{args.image_side} image)")


if __name__ == "__main__":
    main()

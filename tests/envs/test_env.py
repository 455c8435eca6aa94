"""MultimodalToolEnv: tool calls through the real registry, image bookkeeping, rewards, thread safety."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from axpo_rllm.envs.env import EnvStateError, MultimodalToolEnv, run_sync
from axpo_rllm.envs.search_server import BM25Index, RetrievalServer
from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult
from axpo_rllm.envs.tools.crop import CropTool
from axpo_rllm.envs.tools.search import SearchTool
from axpo_rllm.envs.verifiers import Grader, GraderStats
from axpo_rllm.core.records import Task
from axpo_rllm.demo.facts import make_fact_corpus


class StampTool(Tool):
    """Returns a new 8x8 image whose colour encodes how many images the call saw."""

    name = "stamp"
    description = "test tool"
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        await asyncio.sleep(0.005)
        return ToolResult(text=f"saw {len(context.images)}", images=(Image.new("RGB", (8, 8), (len(context.images) % 256, 0, 0)),))


class DelayedImageTool(Tool):
    """Returns an image of the requested width after the requested delay."""

    name = "delayed"
    description = "test tool"
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        await asyncio.sleep(arguments["delay"])
        return ToolResult(text=f"saw {len(context.images)}", images=(Image.new("RGB", (arguments["width"], 4)),))


class SleepTool(Tool):
    name = "sleep"
    description = "test tool"
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        await asyncio.sleep(arguments.get("seconds", 5))
        return ToolResult(text="woke up")


def make_task(data_source="search_qa", answer="Belmorin", n_images=1, task_id="t1"):
    images = tuple(Image.new("RGB", (200, 100), (0, 0, 255)) for _ in range(n_images))
    return Task(task_id=task_id, question="What is the capital of Fensilrin?", answer=answer, data_source=data_source, images=images)


@pytest.fixture(scope="module")
def search_server():
    docs, qa = make_fact_corpus(50, seed=3)
    with RetrievalServer(BM25Index(docs)) as server:
        yield server, qa


@pytest.fixture
def grader():
    return Grader(stats=GraderStats())


def test_default_tools_are_all_discovered(grader):
    env = MultimodalToolEnv(make_task(), grader=grader)
    assert {"crop", "python", "search"} <= set(env.tool_names)
    assert {s["function"]["name"] for s in env.tool_schemas()} == set(env.tool_names)
    env.close()


def test_tools_by_name_with_configs(grader, search_server):
    server, qa = search_server
    env = MultimodalToolEnv(make_task(), tools=["search"], tool_configs={"search": {"base_url": server.url}}, grader=grader)
    assert env.tool_names == ("search",)
    obs = env.call_tool("search", {"query": qa[0][0]})
    assert not obs.is_error and qa[0][1] in obs.model_text
    env.close()
    with pytest.raises(ValueError, match=r"\['crop'\]"):
        MultimodalToolEnv(tools=["search"], tool_configs={"crop": {}})
    with pytest.raises(ValueError, match="tool instances"):
        MultimodalToolEnv(tools={"crop": CropTool()}, tool_configs={"crop": {}})


def test_crop_images_are_appended_and_indexable(grader):
    env = MultimodalToolEnv(make_task(n_images=2), tools={"crop": CropTool()}, grader=grader)
    first = env.call_tool("crop", {"image_index": 1, "bbox": [0, 0, 500, 500]})
    assert not first.is_error and first.image_indices == (2,) and first.images[0].size == (100, 50)
    second = env.call_tool("crop", '{"image_index": 2, "bbox": [0, 0, 1000, 500]}')  # JSON string arguments
    assert second.image_indices == (3,) and second.images[0].size == (100, 28)  # short side grown to 28 px
    assert len(env.images) == 4 and env.images[3] is second.images[0]
    assert env.stats() == {"tool_calls": 2, "tool_errors": 0, "calls_by_tool": {"crop": 2}, "errors_by_tool": {}}


def test_errors_are_observations_and_counted(grader):
    env = MultimodalToolEnv(make_task(), tools={"crop": CropTool()}, grader=grader)
    unknown = env.call_tool("zoom", {})
    bad_json = env.call_tool("crop", "{not json")
    bad_box = env.call_tool("crop", {"image_index": 0, "bbox": [10, 10, 10, 5]})  # no width
    out_of_range = env.call_tool("crop", {"image_index": 7, "bbox": [0, 0, 10, 10]})
    for obs in (unknown, bad_json, bad_box, out_of_range):
        assert obs.is_error and obs.model_text.startswith("Error: ") and obs.image_indices == ()
    assert "zoom" in unknown.error and "crop" in unknown.error
    assert env.stats()["tool_errors"] == 4 and env.stats()["errors_by_tool"] == {"zoom": 1, "crop": 3}
    assert len(env.images) == 1


def test_finish_grades_and_closes_the_episode(grader):
    env = MultimodalToolEnv(make_task(), tools={"crop": CropTool()}, grader=grader)
    verdict = env.finish("<think>searching</think>The capital is \\boxed{Belmorin}.")
    assert verdict.reward == 1.0 and verdict.correct and env.done and env.result is verdict
    with pytest.raises(EnvStateError, match="'t1' is finished"):
        env.call_tool("crop", {"bbox": [0, 0, 10, 10]})
    with pytest.raises(EnvStateError):
        env.finish("again")
    env.reset(make_task(data_source="math", answer="\\frac{1}{2}", task_id="t2"))
    assert not env.done and env.stats()["tool_calls"] == 0
    assert env.finish("\\boxed{0.5}").reward == 1.0


def test_grader_failure_is_reward_zero_and_counted(grader):
    env = MultimodalToolEnv(make_task(data_source="no_such_source"), tools={}, grader=grader)
    verdict = env.finish("\\boxed{Belmorin}")
    assert verdict.reward == 0.0 and verdict.failure is not None
    assert grader.stats.failures == 1


def test_state_errors():
    env = MultimodalToolEnv(tools={}, grader=Grader(stats=GraderStats()))
    with pytest.raises(EnvStateError, match="reset"):
        env.call_tool("crop", {})
    with pytest.raises(TypeError, match="Task"):
        env.reset({"question": "dict tasks go through the rllm adapter"})


def test_slow_tool_times_out(grader):
    env = MultimodalToolEnv(make_task(), tools={"sleep": SleepTool()}, grader=grader, call_timeout_s=0.1)
    started = time.perf_counter()
    obs = env.call_tool("sleep", {"seconds": 5})
    assert obs.is_error and "timed out after 0.1s" in obs.error and time.perf_counter() - started < 2


def test_concurrent_calls_from_threads_keep_images_consistent(grader):
    env = MultimodalToolEnv(make_task(n_images=2), tools={"stamp": StampTool()}, grader=grader)
    with ThreadPoolExecutor(max_workers=16) as pool:
        observations = list(pool.map(lambda _: env.call_tool("stamp", {}), range(64)))
    indices = sorted(i for obs in observations for i in obs.image_indices)
    assert indices == list(range(2, 66))
    images = env.images
    for obs in observations:
        assert images[obs.image_indices[0]] is obs.images[0]  # the index the model is told is right
    assert env.stats()["tool_calls"] == 64


def test_concurrent_async_calls_and_finish_race(grader):
    env = MultimodalToolEnv(make_task(), tools={"stamp": StampTool()}, grader=grader)

    async def many():
        return await asyncio.gather(*(env.acall_tool("stamp", {}) for _ in range(20)))

    observations = asyncio.run(many())
    assert sorted(o.image_indices[0] for o in observations) == list(range(1, 21))

    winners, losers = [], []

    def try_finish():
        try:
            winners.append(env.finish("\\boxed{Belmorin}"))
        except EnvStateError:
            losers.append(1)

    threads = [threading.Thread(target=try_finish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7 and env.result is winners[0]


def test_search_and_crop_share_one_episode(grader, search_server):
    server, qa = search_server
    search = SearchTool(base_url=server.url)
    env = MultimodalToolEnv(make_task(), tools={"search": search, "crop": CropTool()}, grader=grader)
    assert qa[1][1] in env.call_tool("search", {"query": qa[1][0]}).text
    assert env.call_tool("crop", {"bbox": [0, 0, 500, 1000]}).image_indices == (1,)
    assert env.stats()["calls_by_tool"] == {"search": 1, "crop": 1}
    env.close()  # shared instances stay open
    assert qa[1][1] in env.call_tool("search", {"query": qa[1][0]}).text
    run_sync(search.aclose())


def test_run_sync_refuses_a_running_loop():
    async def inner():
        with pytest.raises(RuntimeError, match="acall_tool"):
            run_sync(asyncio.sleep(0))

    asyncio.run(inner())


def test_one_turns_calls_get_indices_in_call_order(grader):
    """The slow first call finishes last but its image still comes first, as the agent shows them."""
    env = MultimodalToolEnv(make_task(), tools={"delayed": DelayedImageTool()}, grader=grader)
    slow, fast, bad = env.call_tools([("delayed", {"delay": 0.2, "width": 11}), ("delayed", {"delay": 0.0, "width": 22}), ("nope", {})])
    assert (slow.image_indices, fast.image_indices, bad.image_indices) == ((1,), (2,), ())
    assert slow.text == fast.text == "saw 1"  # both saw the images as they were before the turn
    assert [im.size[0] for im in env.images[1:]] == [11, 22] and bad.is_error


class ImageOfTool(Tool):
    """Returns the image its arguments describe: a size, or the first bytes of a PNG file."""

    name = "image_of"
    description = "test tool"
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        import io

        if arguments.get("truncated"):
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, "PNG")
            image = Image.open(io.BytesIO(buffer.getvalue()[:80]))  # a header, then nothing: opens lazily
            return ToolResult(text="made", images=(image,))
        return ToolResult(text="made", images=(Image.new("RGB", tuple(arguments["size"])),))


@pytest.mark.parametrize("arguments, problem", [
    ({"size": [0, 0]}, "0x0 px"),
    ({"size": [40000, 1]}, "aspect ratio 40000"),
    ({"size": [3, 30000]}, "aspect ratio 10000"),
    ({"truncated": True}, "do not decode"),
])
def test_an_image_the_model_cannot_take_is_the_tools_error(arguments, problem):
    env = MultimodalToolEnv(task=make_task(), tools={"image_of": ImageOfTool()})
    obs = env.call_tool("image_of", arguments)
    assert obs.is_error and problem in obs.error and "cannot be shown to the model" in obs.error
    assert obs.images == () and len(env.images) == 1, "nothing of the bad result enters the episode"
    assert env.stats()["errors_by_tool"] == {"image_of": 1}
    ok = env.call_tool("image_of", {"size": [400, 2]})  # an aspect ratio of 200 is still taken
    assert not ok.is_error and ok.image_indices == (1,)


def test_the_python_tools_extreme_images_become_error_observations():
    """Through the sandbox for real: a 40000x1 image comes back (the sandbox shrinks only by pixel
    count), and the env refuses it before it can reach the model's processor."""
    env = MultimodalToolEnv(task=make_task(n_images=0), tools=["python"],
                            tool_configs={"python": {"min_isolation": "rlimits"}})
    try:
        obs = env.call_tool("python", {"code": "from PIL import Image\ndisplay(Image.new('RGB', (40000, 1)))"})
        assert obs.is_error and "40000x1 px" in obs.error, obs
        zero = env.call_tool("python", {"code": "from PIL import Image\ndisplay(Image.new('RGB', (0, 0)))"})
        assert zero.is_error and "0x0" in zero.error, zero
        fine = env.call_tool("python", {"code": "from PIL import Image\ndisplay(Image.new('RGB', (64, 32)))"})
        assert not fine.is_error and fine.image_indices == (0,)
    finally:
        env.close()

"""verl BaseTool adapters and configs/tools.yaml, against the installed verl (0.9.1)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from axpo_rllm.envs.search_server import BM25Index, RetrievalServer
from axpo_rllm.envs.adapters.verl import AXPOVerlTool, verl_schema
from axpo_rllm.envs.tools.sandbox import IsolationBelowFloor
from axpo_rllm.demo.facts import make_fact_corpus

verl_registry = pytest.importorskip("verl.tools.tool_registry")
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse  # noqa: E402

TOOLS_YAML = Path(__file__).resolve().parents[2] / "configs" / "tools.yaml"


@pytest.fixture(scope="module")
def corpus():
    docs, qa = make_fact_corpus(40, seed=9)
    with RetrievalServer(BM25Index(docs)) as server:
        yield server, qa


def tools_yaml(tmp_path) -> str:
    """The shipped yaml where bwrap is installed; elsewhere a copy with the python tool's floor
    lowered (these tests are about the adapters; the floor has its own test below)."""
    if shutil.which("bwrap"):
        return str(TOOLS_YAML)
    text = TOOLS_YAML.read_text().replace("min_isolation: bwrap", "min_isolation: rlimits")
    copy = tmp_path / "tools.yaml"
    copy.write_text(text.replace("private_uid: true", "private_uid: false"))
    return str(copy)


@pytest.fixture
def verl_tools(corpus, monkeypatch, tmp_path):
    """The yaml loaded by verl's own loader, with the search server's URL in the environment."""
    monkeypatch.setenv("AXPO_SEARCH_URL", corpus[0].url)
    monkeypatch.setenv("AXPO_SEARCH_CACHE", str(tmp_path / "search.sqlite"))
    tools = {tool.name: tool for tool in verl_registry.initialize_tools_from_config(tools_yaml(tmp_path))}
    yield tools
    for tool in tools.values():
        asyncio.run(tool.tool.aclose())


def picture():
    return Image.new("RGB", (300, 200), (200, 30, 30))


def test_yaml_loads_with_verls_loader(verl_tools, corpus, tmp_path):
    assert sorted(verl_tools) == ["crop", "python", "search"]
    for tool in verl_tools.values():
        assert isinstance(tool, AXPOVerlTool)
        # The yaml repeats each schema for readability; it must not drift from the tool's own.
        assert tool.tool_schema == verl_schema(tool.tool), tool.name
    search = verl_tools["search"].tool
    assert search.backend.base_url == corpus[0].url and str(search.cache.path) == str(tmp_path / "search.sqlite")


def test_the_python_tool_refuses_to_start_below_its_floor_without_bwrap(corpus, monkeypatch, tmp_path):
    # The shipped yaml asks for bwrap with a private uid: on a machine without bubblewrap (a PATH
    # without it) verl's loader fails when it builds the tool, with the fix in the message.
    monkeypatch.setenv("AXPO_SEARCH_URL", corpus[0].url)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("AXPO_SANDBOX_ISOLATION", raising=False)
    refusal = r"min_isolation='bwrap' with a private uid per call.*apt-get install bubblewrap"
    with pytest.raises(IsolationBelowFloor, match=refusal):
        verl_registry.initialize_tools_from_config(str(TOOLS_YAML))


async def crop_twice(tool: AXPOVerlTool):
    instance_id, created = await tool.create(create_kwargs={"image": picture()})
    assert created == ToolResponse()
    first, reward, metrics = await tool.execute(instance_id, {"bbox": [0, 0, 500, 500]})
    second, _, _ = await tool.execute(instance_id, {"image_index": 1, "bbox": [0, 0, 500, 1000]})  # crop of the crop
    bad, _, bad_metrics = await tool.execute(instance_id, {"image_index": 9, "bbox": [0, 0, 10, 10]})
    await tool.release(instance_id)
    return first, reward, metrics, second, bad, bad_metrics, await tool.calc_reward(instance_id)


def test_crop_through_verl_tool(verl_tools):
    first, reward, metrics, second, bad, bad_metrics, final_reward = asyncio.run(crop_twice(verl_tools["crop"]))
    assert isinstance(first, ToolResponse) and first.image[0].size == (150, 100) and reward == 0.0
    assert metrics["tool_error"] == 0.0
    assert second.image[0].size == (75, 100)
    assert bad.image is None and bad.text.startswith("Error: ") and "9" in bad.text and bad_metrics["tool_error"] == 1.0
    assert final_reward == 0.0 and verl_tools["crop"]._instance_images == {}


def test_search_through_verl_tool(verl_tools, corpus):
    question, answer = corpus[1][4]

    async def search():
        instance_id, _ = await verl_tools["search"].create()
        response, _, metrics = await verl_tools["search"].execute(instance_id, {"query": question, "top_k": 2})
        await verl_tools["search"].release(instance_id)
        return response, metrics

    response, metrics = asyncio.run(search())
    assert answer in response.text and response.image is None and metrics["num_results"] == 2


def test_agent_data_images_are_the_context(verl_tools):
    """In verl's loop the episode's images live in agent_data.image_data (prompt images + tool images)."""
    small, big = Image.new("RGB", (50, 50)), Image.new("RGB", (1000, 800))
    agent_data = SimpleNamespace(image_data=[small, big], request_id="req-1")

    async def crop():
        instance_id, _ = await verl_tools["crop"].create(create_kwargs={})
        return await verl_tools["crop"].execute(instance_id, {"image_index": 1, "bbox": [0, 0, 500, 500]}, agent_data=agent_data)

    response, _, _ = asyncio.run(crop())
    assert response.image[0].size == (500, 400)
    assert len(agent_data.image_data) == 2  # verl's loop appends tool images itself


def test_through_verls_tool_agent_loop_dispatch(verl_tools, corpus):
    """verl's own ToolAgentLoop._call_tool: create(create_kwargs=...) -> execute(agent_data=...) -> release."""
    from verl.experimental.agent_loop.tool_agent_loop import AgentData, ToolAgentLoop
    from verl.experimental.agent_loop.tool_parser import FunctionCall

    loop_self = SimpleNamespace(tools=verl_tools, max_tool_response_length=4096, tool_response_truncate_side="middle")
    agent_data = AgentData(
        messages=[], image_data=[picture()], video_data=None, audio_data=None, mm_processor_kwargs=None,
        metrics={}, request_id="r1", tools_kwargs={},
    )
    question, answer = corpus[1][0]

    async def dispatch(name, arguments):
        return await ToolAgentLoop._call_tool(loop_self, FunctionCall(name=name, arguments=arguments), {}, agent_data)

    crop, _, _ = asyncio.run(dispatch("crop", '{"bbox": [0, 0, 1000, 500]}'))
    search, _, _ = asyncio.run(dispatch("search", f'{{"query": "{question}"}}'))
    assert crop.image[0].size == (300, 100)
    assert answer in search.text


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="'tool'"):
        AXPOVerlTool({"type": "native"}, None)
    schema = OpenAIFunctionToolSchema.model_validate({"type": "function", "function": {"name": "zoom", "description": "x"}})
    with pytest.raises(ValueError, match="'zoom'.*'crop'"):
        AXPOVerlTool({"type": "native", "tool": "crop"}, schema)

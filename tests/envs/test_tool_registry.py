"""Tool discovery through entry points and the call_tool dispatcher.

The third-party test builds a real package in tmp_path, pip-installs it into this venv and shows
a fresh interpreter finding and running its tool with no change to this project.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import sys
import textwrap
import uuid

import pytest
from PIL import Image

from axpo_rllm.envs.tools import registry
from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult
from axpo_rllm.envs.tools.crop import CropTool
from axpo_rllm.envs.tools.python_code import PythonCodeTool
from axpo_rllm.envs.tools.registry import ToolDiscoveryError, call_tool, discover_tools, parse_arguments

EP = importlib.metadata.EntryPoint


def fake_entry_points(monkeypatch, *entry_points):
    monkeypatch.setattr(registry.importlib.metadata, "entry_points", lambda group: [e for e in entry_points if e.group == group])


class EchoTool(Tool):
    name = "echo"
    description = "Echo the text."
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    async def call(self, arguments, context):
        return ToolResult(text=str(arguments.get("text")))


class RaisingTool(EchoTool):
    name = "raiser"

    async def call(self, arguments, context):
        raise RuntimeError("boom inside the tool")


class WrongReturnTool(EchoTool):
    name = "wrong"

    async def call(self, arguments, context):
        return "not a ToolResult"


NotATool = object()


def test_builtins_are_found_through_entry_points():
    tools = discover_tools(only=["crop", "python"])
    assert tools == {"crop": CropTool, "python": PythonCodeTool}
    declared = {ep.name for ep in importlib.metadata.entry_points(group="axpo_rllm.tools")}
    assert {"crop", "python"} <= declared


def test_unknown_name_in_only_is_an_error():
    with pytest.raises(ToolDiscoveryError, match=r"no tool named \['nope'\]"):
        discover_tools(only=["nope"])


def test_broken_entry_point_names_itself(monkeypatch):
    fake_entry_points(monkeypatch, EP("ghost", "no_such_module_xyz:Ghost", "axpo_rllm.tools"))
    with pytest.raises(ToolDiscoveryError, match=r"cannot load entry point 'ghost' = 'no_such_module_xyz:Ghost'.*ModuleNotFoundError"):
        discover_tools()


def test_entry_point_to_a_non_tool_is_an_error(monkeypatch):
    fake_entry_points(monkeypatch, EP("echo", f"{__name__}:NotATool", "axpo_rllm.tools"))
    with pytest.raises(ToolDiscoveryError, match="not a subclass"):
        discover_tools()


def test_class_name_must_match_entry_point_name(monkeypatch):
    fake_entry_points(monkeypatch, EP("shout", f"{__name__}:EchoTool", "axpo_rllm.tools"))
    with pytest.raises(ToolDiscoveryError, match="class's name is 'echo'"):
        discover_tools()


def test_duplicate_names_with_different_targets_are_an_error(monkeypatch):
    fake_entry_points(
        monkeypatch,
        EP("echo", f"{__name__}:EchoTool", "axpo_rllm.tools"),
        EP("echo", "other_pkg.tools:Echo", "axpo_rllm.tools"),
    )
    with pytest.raises(ToolDiscoveryError, match="duplicate tool name 'echo'"):
        discover_tools()


def test_same_entry_point_seen_twice_is_one_tool(monkeypatch):
    same = EP("echo", f"{__name__}:EchoTool", "axpo_rllm.tools")
    fake_entry_points(monkeypatch, same, EP("echo", f"{__name__}:EchoTool", "axpo_rllm.tools"))
    assert discover_tools() == {"echo": EchoTool}


# ---------------------------------------------------------------------------------- call_tool


def dispatch(name, arguments, tools=None, images=()):
    tools = tools if tools is not None else {"echo": EchoTool(), "raiser": RaisingTool(), "wrong": WrongReturnTool(), "crop": CropTool()}
    return asyncio.run(call_tool(tools, name, arguments, ToolContext(images=tuple(images))))


def test_call_tool_accepts_dicts_json_and_double_encoded_json():
    assert dispatch("echo", {"text": "hi"}).text == "hi"
    assert dispatch("echo", '{"text": "hi"}').text == "hi"
    assert dispatch("echo", json.dumps(json.dumps({"text": "hi"}))).text == "hi"


@pytest.mark.parametrize(
    "name, arguments, expected",
    [
        ("nope", {}, "unknown tool 'nope'"),
        (None, {}, "unknown tool None"),
        (["echo"], {}, "unknown tool ['echo']"),
        ("echo", "{not json", "not valid JSON"),
        ("echo", "[1, 2]", "must be a JSON object, got list"),
        ("echo", 42, "must be a JSON object, got int"),
        ("echo", None, "must be a JSON object, got NoneType"),
        ("echo", '"just a string"', "not valid JSON"),
        ("echo", "[" * 100_000, "not valid JSON"),
        ("echo", "x" * (registry.MAX_ARGUMENT_CHARS + 1), "characters long"),
        ("raiser", {}, "raiser failed: RuntimeError: boom inside the tool"),
        ("wrong", {}, "returned str, not a ToolResult"),
    ],
)
def test_call_tool_turns_every_failure_into_an_error_observation(name, arguments, expected):
    result = dispatch(name, arguments)
    assert isinstance(result, ToolResult) and result.is_error
    assert expected in result.error, result.error


def test_call_tool_lists_the_available_tools_for_unknown_names():
    assert "available tools: ['crop', 'echo', 'raiser', 'wrong']" in dispatch("zoom", {}).error


def test_call_tool_runs_crop_and_records_timing():
    result = dispatch("crop", '{"bbox": [0, 0, 500, 500]}', images=[Image.new("RGB", (100, 100))])
    assert not result.is_error and result.images[0].size == (50, 50)
    assert result.metadata["tool"] == "crop" and result.metadata["seconds"] >= 0


def test_parse_arguments_keeps_objects():
    assert parse_arguments({"a": 1}) == {"a": 1}


# ----------------------------------------------------------------------- a third-party package

PLUGIN_MODULE = '''
from axpo_rllm.envs.tools.base import Tool, ToolResult


class ReverseTool(Tool):
    name = "{name}"
    description = "Reverse a string."
    parameters = {{"type": "object", "properties": {{"text": {{"type": "string"}}}}, "required": ["text"]}}

    async def call(self, arguments, context):
        return ToolResult(text=arguments["text"][::-1], metadata={{"images_seen": len(context.images)}})
'''

PROBE = """
import asyncio, json
from axpo_rllm.envs.tools.base import ToolContext
from axpo_rllm.envs.tools.registry import call_tool, discover_tools
classes = discover_tools(only=["{name}", "crop"])
tools = {{name: cls() for name, cls in classes.items()}}
result = asyncio.run(call_tool(tools, "{name}", '{{"text": "abc"}}', ToolContext()))
print(json.dumps({{"module": classes["{name}"].__module__, "text": result.text, "error": result.error}}))
"""


@pytest.fixture
def installed_plugin(tmp_path):
    """A throwaway package declaring one tool in the axpo_rllm.tools group, installed with pip."""
    suffix = uuid.uuid4().hex[:8]
    dist, module, tool_name = f"axpo-test-plugin-{suffix}", f"axpo_test_plugin_{suffix}", f"reverse_{suffix}"
    (tmp_path / f"{module}.py").write_text(PLUGIN_MODULE.format(name=tool_name))
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [tool.setuptools]
        py-modules = ["{module}"]

        [project.entry-points."axpo_rllm.tools"]
        {tool_name} = "{module}:ReverseTool"
    """))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(tmp_path)], check=True, cwd=tmp_path, timeout=180)
    try:
        yield tool_name, module
    finally:
        subprocess.run(pip + ["uninstall", "-y", dist], check=False, cwd=tmp_path, timeout=120)


def test_a_pip_installed_third_party_tool_is_found_and_runs(installed_plugin, tmp_path):
    tool_name, module = installed_plugin
    out = subprocess.run([sys.executable, "-c", PROBE.format(name=tool_name)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"module": module, "text": "cba", "error": ""}

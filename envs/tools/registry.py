"""Finding tools (entry points) and calling them safely (the dispatcher).

The host never imports a tool by name: :func:`discover_tools` asks
``importlib.metadata.entry_points(group="axpo_rllm.tools")``; the built-ins are declared in this
project's ``setup.cfg`` exactly as a third-party package declares its own, so the third-party path
is the path every test run exercises.

The environment calls tools through one function::

    async def call_tool(tools: Mapping[str, Tool], name: Any, arguments: str | dict | Any,
                        context: ToolContext) -> ToolResult

``name`` and ``arguments`` come straight from the parsed model output: ``arguments`` may be a dict,
a JSON string (also a JSON string holding a JSON string, a known model/parser bug) or anything
else. Whatever happens -- unknown tool name, invalid JSON, arguments that are not an object,
oversized arguments, an exception inside the tool, a tool returning the wrong type -- the answer
is a :class:`ToolResult`, with ``error`` set when the call failed. ``asyncio.CancelledError``
(and other ``BaseException``) still propagates, so timeouts and shutdown work.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult

__all__ = ["TOOL_GROUP", "ToolDiscoveryError", "discover_tools", "call_tool", "MAX_ARGUMENT_CHARS"]

TOOL_GROUP = "axpo_rllm.tools"
MAX_ARGUMENT_CHARS = 1_000_000
"""Longer argument strings are refused before parsing (a model can emit megabytes)."""


class ToolDiscoveryError(RuntimeError):
    """An entry point in the tool group is broken or conflicts with another one."""


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    origin = f" (from distribution {dist.metadata['Name']!r})" if dist is not None else ""
    return f"entry point {ep.name!r} = {ep.value!r} in group {ep.group!r}{origin}"


def _unique_entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points by name. The same (name, value) seen twice -- an editable install plus a
    stray ``*.egg-info`` on ``sys.path`` -- is one tool; one name with two values is an error."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise ToolDiscoveryError(
                f"duplicate tool name {ep.name!r}: {_describe(previous)} and {_describe(ep)}; "
                "uninstall one of the packages or rename its entry point"
            )
        found[ep.name] = ep
    return found


def _load_tool_class(ep: importlib.metadata.EntryPoint) -> type[Tool]:
    try:
        obj = ep.load()
    except Exception as exc:  # any import-time failure of a plug-in must name the plug-in
        raise ToolDiscoveryError(f"cannot load {_describe(ep)}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Tool)):
        raise ToolDiscoveryError(f"{_describe(ep)} points to {obj!r}, which is not a subclass of axpo_rllm Tool")
    if getattr(obj, "name", None) != ep.name:
        raise ToolDiscoveryError(
            f"{_describe(ep)}: the class's name is {getattr(obj, 'name', None)!r}; it must equal the entry-point "
            "name, since the model calls the tool by that name"
        )
    return obj


def discover_tools(only: Iterable[str] | None = None, group: str = TOOL_GROUP) -> dict[str, type[Tool]]:
    """Tool classes by name, from the installed entry points of ``group``.

    ``only`` loads just those names (a config that uses two tools need not import the third);
    a name in ``only`` that no entry point declares is an error. Raises :class:`ToolDiscoveryError`
    for an entry point that fails to import, does not point at a :class:`Tool` subclass, whose
    class ``name`` differs from the entry-point name, or whose name is declared twice.
    """
    entry_points = _unique_entry_points(group)
    wanted = list(entry_points) if only is None else list(only)
    missing = [name for name in wanted if name not in entry_points]
    if missing:
        raise ToolDiscoveryError(f"no tool named {missing} in entry-point group {group!r}; installed: {sorted(entry_points)}")
    return {name: _load_tool_class(entry_points[name]) for name in wanted}


def _short(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters: a model may write megabytes into one argument."""
    return _cut(repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_arguments(arguments: Any) -> dict:
    """The argument object of a call; raises ``ValueError`` with a model-facing message."""
    if isinstance(arguments, (str, bytes, bytearray)):
        if len(arguments) > MAX_ARGUMENT_CHARS:
            raise ValueError(f"arguments are {len(arguments)} characters long, more than {MAX_ARGUMENT_CHARS}")
        for _ in range(2):  # a JSON string that holds the JSON object (double encoding)
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"arguments are not valid JSON ({type(exc).__name__}: {_cut(str(exc), 120)})") from None
            if not isinstance(arguments, str):
                break
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(arguments).__name__} {_short(arguments)}")
    return arguments


async def call_tool(tools: Mapping[str, Tool], name: Any, arguments: Any, context: ToolContext) -> ToolResult:
    """Run one tool call; every failure becomes an error :class:`ToolResult` (see module docstring)."""
    start = time.perf_counter()
    if not isinstance(name, str) or name not in tools:
        return ToolResult.fail(f"unknown tool {_short(name)}; available tools: {sorted(tools)}", tool=None)
    try:
        parsed = parse_arguments(arguments)
    except ValueError as exc:
        return ToolResult.fail(f"{name}: {exc}", tool=name)
    try:
        result = await tools[name].call(parsed, context)
    except Exception as exc:  # a tool bug is an observation, never a crashed episode
        return ToolResult.fail(f"{name} failed: {type(exc).__name__}: {_cut(str(exc), 300)}", tool=name, exception=repr(exc)[:1000])
    if not isinstance(result, ToolResult):
        return ToolResult.fail(f"{name} returned {type(result).__name__}, not a ToolResult", tool=name)
    result.metadata.setdefault("tool", name)
    result.metadata.setdefault("seconds", time.perf_counter() - start)
    return result

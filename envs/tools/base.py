"""The one tool protocol of axpo-rllm.

A tool is a class with a ``name``, an OpenAI-style JSON schema (what the chat template's tools
block shows the model) and an async ``call`` that returns a :class:`ToolResult`: text and/or
images, or an error observation. Tools never raise for bad model input: a bad call is an
observation the model sees (``ToolResult.error``).

Third-party tools declare themselves in the ``axpo_rllm.tools`` entry-point group, exactly like
the built-ins in this project's ``setup.cfg``::

    [options.entry_points]
    axpo_rllm.tools =
        my_tool = my_pkg.tools:MyTool
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["ToolContext", "ToolResult", "Tool"]


@dataclass(frozen=True)
class ToolResult:
    """What a tool hands back to the environment."""

    text: str = ""
    images: tuple[Any, ...] = ()
    """``PIL.Image.Image`` objects, appended to the episode's image list in order."""
    error: str = ""
    """Non-empty: the call failed; the model sees this as an error observation."""
    metadata: dict = field(default_factory=dict)
    """Timings, sandbox status, cache hit ... (logged, never shown to the model)."""

    @property
    def is_error(self) -> bool:
        return bool(self.error)

    @classmethod
    def fail(cls, message: str, **metadata: Any) -> "ToolResult":
        return cls(error=message, metadata=dict(metadata))


@dataclass(frozen=True)
class ToolContext:
    """What a call may see of the episode."""

    images: tuple[Any, ...] = ()
    """The task's images, then every image earlier tool calls returned, in order (index = position)."""
    task_id: str = ""
    metadata: dict = field(default_factory=dict)


class Tool(abc.ABC):
    """Base class of every tool (built-in or third-party)."""

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[dict]
    """JSON schema (``{"type": "object", "properties": ..., "required": [...]}``) of the arguments."""

    def __init__(self, **config: Any) -> None:
        self.config = dict(config)

    def schema(self) -> dict:
        """The OpenAI-style function schema the chat template renders in its tools block."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @abc.abstractmethod
    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        """Run one call. Must not raise for bad ``arguments``: return ``ToolResult.fail(...)``."""

    async def aclose(self) -> None:
        """Release pools, clients, servers. Called once when the environment closes."""

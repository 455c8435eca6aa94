"""verl ``BaseTool`` adapters of our tools, for verl's ``tool_agent`` loop and ``configs/tools.yaml``.

One generic class, :class:`AXPOVerlTool`, wraps any tool of the ``axpo_rllm.tools`` entry-point
group; the yaml picks which one with ``config.tool`` and passes its constructor keywords in
``config.tool_config``::

    tools:
      - class_name: axpo_rllm.envs.adapters.verl.AXPOVerlTool
        config: {type: native, tool: crop, tool_config: {coordinates: relative_1000}}
        tool_schema: {...}        # optional; default: the tool's own schema

verl contracts relied on (verl 0.9.1, ``verl/tools/base_tool.py`` and
``experimental/agent_loop/tool_agent_loop.py``): ``BaseTool(config, tool_schema)``; the loop calls
``create(create_kwargs=...)``, ``execute(instance_id, parameters, agent_data=...)`` and
``release(instance_id)`` around every single call; ``ToolResponse(text, image)`` with images as
a list. ``agent_data.image_data`` is the episode's image list (prompt images, then every image a
tool returned), which is exactly our :attr:`ToolContext.images`; without ``agent_data`` the images
given to ``create`` (``create_kwargs["images"]`` or ``["image"]``) are used.
"""

from __future__ import annotations

from typing import Any, Optional
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from axpo_rllm.envs.tools.base import Tool, ToolContext
from axpo_rllm.envs.tools.registry import call_tool, discover_tools

__all__ = ["AXPOVerlTool", "verl_schema"]


def verl_schema(tool: Tool) -> OpenAIFunctionToolSchema:
    """Our tool's schema as verl's pydantic model (verl keeps type/description/enum per property)."""
    return OpenAIFunctionToolSchema.model_validate(tool.schema())


def _images_from(create_kwargs: dict) -> list[Any]:
    images = create_kwargs.get("images")
    if images is None:
        image = create_kwargs.get("image")
        images = [] if image is None else [image]
    return list(images)


class AXPOVerlTool(BaseTool):
    """A verl tool backed by one of our tools (``config["tool"]`` names its entry point)."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None) -> None:
        name = config.get("tool")
        if not isinstance(name, str):
            raise ValueError(f"AXPOVerlTool config needs 'tool' (an axpo_rllm.tools entry-point name), got {name!r}")
        tool_cls = discover_tools(only=[name])[name]
        self.tool: Tool = tool_cls(**dict(config.get("tool_config") or {}))
        if tool_schema is not None and tool_schema.function.name != name:
            raise ValueError(f"tool_schema names the function {tool_schema.function.name!r}, but config.tool is {name!r}")
        super().__init__(config, tool_schema or verl_schema(self.tool))
        self._instance_images: dict[str, list[Any]] = {}

    async def create(self, instance_id: Optional[str] = None, create_kwargs: Optional[dict] = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        self._instance_images[instance_id] = _images_from({**kwargs, **(create_kwargs or {})})
        return instance_id, ToolResponse()

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        agent_data = kwargs.get("agent_data")
        images = getattr(agent_data, "image_data", None)
        own_images = self._instance_images.setdefault(instance_id, [])
        if images is None:
            images = own_images
        context = ToolContext(images=tuple(images), task_id=getattr(agent_data, "request_id", "") or instance_id)
        result = await call_tool({self.name: self.tool}, self.name, parameters, context)
        metrics = {"tool_error": float(result.is_error), **{k: v for k, v in result.metadata.items() if isinstance(v, (int, float, bool))}}
        if result.is_error:
            return ToolResponse(text=f"Error: {result.error}"), 0.0, metrics
        if agent_data is None:
            own_images.extend(result.images)  # later calls of this instance can index the new images
        response = ToolResponse(text=result.text or None, image=list(result.images)) if result.images else ToolResponse(text=result.text)
        return response, 0.0, metrics

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        return 0.0  # the reward comes from the verifier at the final answer, not from tool use

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instance_images.pop(instance_id, None)

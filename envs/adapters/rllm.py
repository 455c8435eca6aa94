"""rllm adapters: a ``BaseEnv`` around :class:`MultimodalToolEnv` and rllm ``Tool`` wrappers of our tools.

Thin, at the edge (STYLE): all behaviour lives in the framework-free env and tools. This module
imports without rllm; the rllm-backed classes are built on first access (PEP 562 module
``__getattr__``) and raise a clear ImportError then if rllm is missing::

    from axpo_rllm.envs.adapters.rllm import AXPOToolEnv      # needs rllm
    from axpo_rllm.envs.adapters.rllm import rllm_tool_map     # builds classes lazily too

rllm contracts relied on (rllm-org/rllm 0.3.0.pre, docs/upstream.md §4): ``BaseEnv.reset(task) ->
(obs, info)``, ``step(action) -> (obs, reward, done, info)``, ``from_dict(info)``,
``is_multithread_safe()`` (asserted by the workflow engine; env steps run in a thread pool);
``Tool(name=...)`` (``MultiTool`` instantiates ``tool_cls(name=name)``) returning
``ToolOutput(name, output, error, metadata)``. Tool messages cannot carry images in rllm, so
images travel in ``obs["images"]`` / ``ToolOutput.metadata["images"]`` for the agent to attach
to a user message.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

from axpo_rllm.envs.env import MultimodalToolEnv, Observation, run_sync
from axpo_rllm.envs.images import ImageError, open_image
from axpo_rllm.envs.tools.base import Tool, ToolContext
from axpo_rllm.envs.tools.registry import discover_tools
from axpo_rllm.envs.verifiers import Grader
from axpo_rllm.core.records import Task

# AXPOToolEnv is built on first access by the module __getattr__ below (it subclasses rllm's BaseEnv).
__all__ = ["AXPOToolEnv", "rllm_tool_class", "rllm_tool_map", "task_from_dict", "parse_action", "ParsedCall", "rllm_available"]  # noqa: F822

_ENV_KEYS = ("tools", "tool_configs", "grader_timeout_s", "call_timeout_s")
"""Keys of a ``from_dict`` info dict that configure the env rather than describe the task."""


def rllm_available() -> bool:
    try:
        import rllm.environments.base.base_env  # noqa: F401
        import rllm.tools.tool_base  # noqa: F401
    except ImportError:
        return False
    return True


def _rllm():
    """``(BaseEnv, Tool, ToolOutput)`` from rllm, or an ImportError that says what to do."""
    try:
        from rllm.environments.base.base_env import BaseEnv
        from rllm.tools.tool_base import Tool as RllmTool
        from rllm.tools.tool_base import ToolOutput
    except ImportError as e:
        raise ImportError(
            "axpo_rllm.envs.adapters.rllm needs rllm (https://github.com/rllm-org/rllm; it is not on PyPI: "
            f"install it from source). Importing it failed with: {e}"
        ) from e
    return BaseEnv, RllmTool, ToolOutput


# --------------------------------------------------------------------------------------------
# Tasks and actions (plain Python, no rllm needed)


_TASK_FIELD_SPELLINGS = {
    "task_id": ("task_id", "uid", "id"),
    "question": ("question", "prompt"),
    "answer": ("answer", "ground_truth"),
    "data_source": ("data_source",),
}


def task_from_dict(info: Mapping[str, Any]) -> Task:
    """A :class:`Task` from an rllm task dict (dataset row); unknown keys go to ``metadata``.

    Accepts ``image`` (one) or ``images`` (a list); ``uid``/``id`` for ``task_id``, ``prompt``
    for ``question`` and ``ground_truth`` for ``answer`` (common dataset spellings). Images may be
    PIL images or references (encoded bytes, ``{"bytes", "path"}`` structs as rllm's registry and
    verl's parquet store them, paths): references are decoded here, since engines take pixels.
    """
    # Columnar stores (parquet, Arrow: rllm's registry) fill a key absent from a row with None:
    # drop those, so that a verifier's default applies instead of a None.
    row = {k: v for k, v in info.items() if k not in _ENV_KEYS and v is not None}
    fields: dict[str, str] = {}
    for field_name, spellings in _TASK_FIELD_SPELLINGS.items():
        key = next((k for k in spellings if k in row), None)
        if key is None:
            raise KeyError(f"task dict has no {field_name!r} (accepted spellings {list(spellings)}); got keys {sorted(row)}")
        fields[field_name] = str(row.pop(key))
    images = row.pop("images", None)
    single = row.pop("image", None)
    if images is None:
        images = [single] if single is not None else []
    try:
        images = [open_image(im) for im in images]
    except ImageError as e:
        raise ValueError(f"task {fields['task_id']!r}: {e}") from None
    metadata = {k: v for k, v in dict(row.pop("metadata", None) or {}).items() if v is not None}
    metadata.update(row)
    return Task(images=tuple(images), metadata=metadata, **fields)


@dataclass(frozen=True)
class ParsedCall:
    name: Any
    arguments: Any
    call_id: str = ""


def _as_call(item: Any) -> ParsedCall:
    """One tool call from the shapes agents emit: ``{"name", "arguments"}``, OpenAI's
    ``{"id", "function": {"name", "arguments"}}``, or an object with ``.name``/``.arguments``
    (rllm's ``ToolCall``)."""
    if isinstance(item, Mapping):
        if isinstance(item.get("function"), Mapping):
            fn = item["function"]
            return ParsedCall(fn.get("name"), fn.get("arguments", {}), str(item.get("id", "")))
        return ParsedCall(item.get("name"), item.get("arguments", {}), str(item.get("id", "")))
    if hasattr(item, "name"):
        return ParsedCall(item.name, getattr(item, "arguments", {}), str(getattr(item, "id", "") or ""))
    raise TypeError(f"cannot read a tool call from {type(item).__name__} {item!r:.80}")


def parse_action(action: Any) -> str | list[ParsedCall]:
    """The final response text, or the tool calls of this step.

    Final: a ``str``, or a dict with ``final_answer``/``response``/``answer``. Calls: a list of
    calls, a dict with ``tool_calls``, or a single call dict. An rllm ``Action`` is unwrapped.
    """
    if hasattr(action, "action") and not isinstance(action, Mapping):
        action = action.action
    if isinstance(action, str):
        return action
    if isinstance(action, Mapping):
        for key in ("final_answer", "response", "answer"):
            if isinstance(action.get(key), str):
                return action[key]
        if "tool_calls" in action:
            return [_as_call(c) for c in action["tool_calls"] or ()]
        return [_as_call(action)]
    if isinstance(action, (list, tuple)):
        return [_as_call(c) for c in action]
    raise TypeError(f"action must be a final response (str) or tool call(s), got {type(action).__name__}")


def observation_dict(obs: Observation, call_id: str = "") -> dict:
    return {
        "name": obs.tool,
        "call_id": call_id,
        "text": obs.model_text,
        "error": obs.error,
        "image_indices": list(obs.image_indices),
    }


# --------------------------------------------------------------------------------------------
# The BaseEnv


@functools.cache
def _env_class() -> type:
    BaseEnv, _, _ = _rllm()

    class AXPOToolEnv(BaseEnv):
        """rllm ``BaseEnv`` over :class:`MultimodalToolEnv`.

        ``reset(task)`` returns ``({"question", "images"}, {"task_id", "data_source", "tools"})``.
        ``step(calls)`` runs the calls concurrently and returns ``({"tool_outputs": [...],
        "images": [new images]}, 0.0, False, info)``; ``step(final_response: str)`` grades it and
        returns ``({}, reward, True, info)`` with ``info["correct"]`` and ``info["grader_failure"]``.
        """

        def __init__(
            self,
            task: Mapping | Task | None = None,
            tools: Any = None,
            tool_configs: Mapping[str, Mapping] | None = None,
            grader_timeout_s: float = 10.0,
            call_timeout_s: float = 120.0,
        ) -> None:
            self.env = MultimodalToolEnv(
                tools=tools, tool_configs=tool_configs, grader=Grader(timeout_s=grader_timeout_s), call_timeout_s=call_timeout_s
            )
            self.task = task

        def reset(self, task: Mapping | Task | None = None) -> tuple[dict, dict]:
            task = task if task is not None else self.task
            if task is None:
                raise ValueError("AXPOToolEnv.reset needs a task (none given now or at construction)")
            task = task if isinstance(task, Task) else task_from_dict(task)
            self.task = task
            self.env.reset(task)
            obs = {"question": task.question, "images": list(task.images)}
            return obs, {"task_id": task.task_id, "data_source": task.data_source, "tools": list(self.env.tool_names)}

        def step(self, action: Any) -> tuple[dict, float, bool, dict]:
            parsed = parse_action(action)
            if isinstance(parsed, str):
                verdict = self.env.finish(parsed)
                info = {
                    "correct": verdict.correct,
                    "extracted_answer": verdict.extracted,
                    "grader_failure": verdict.failure,
                    **self.env.stats(),
                }
                return {}, verdict.reward, True, info
            observations = self.env.call_tools([(c.name, c.arguments) for c in parsed])
            obs = {
                "tool_outputs": [observation_dict(o, c.call_id) for o, c in zip(observations, parsed, strict=True)],
                "images": [img for o in observations for img in o.images],
            }
            return obs, 0.0, False, self.env.stats()

        def close(self) -> None:
            self.env.close()

        @staticmethod
        def from_dict(info: dict) -> "AXPOToolEnv":
            """Env config keys (``tools``, ``tool_configs``, timeouts) plus the task's own fields."""
            env_kwargs = {k: info[k] for k in _ENV_KEYS if k in info}
            task_fields = {k: v for k, v in info.items() if k not in _ENV_KEYS}
            return AXPOToolEnv(task=task_from_dict(task_fields) if task_fields else None, **env_kwargs)

        @staticmethod
        def is_multithread_safe() -> bool:
            return True

    return AXPOToolEnv


# --------------------------------------------------------------------------------------------
# rllm Tool wrappers


def rllm_tool_class(tool_cls: type[Tool], **config: Any) -> type:
    """An rllm ``Tool`` subclass wrapping ``tool_cls`` (built with ``config``).

    rllm's ``MultiTool`` instantiates ``cls(name=name)`` only, so the config is bound here.
    Call it with the tool's arguments as keywords, plus an optional ``context=ToolContext(...)``
    carrying the episode's images (crop needs them).
    """
    _, RllmTool, ToolOutput = _rllm()

    class Wrapped(RllmTool):
        axpo_tool_class = tool_cls
        axpo_config = dict(config)

        def __init__(self, name: str | None = None, description: str | None = None, **overrides: Any) -> None:
            self.tool = tool_cls(**{**self.axpo_config, **overrides})
            super().__init__(name=name or tool_cls.name, description=description or tool_cls.description)

        @property
        def json(self) -> dict:
            schema = self.tool.schema()
            schema["function"] = {**schema["function"], "name": self.name, "description": self.description}
            return schema

        async def async_forward(self, context: ToolContext | None = None, **arguments: Any):
            result = await self.tool.call(arguments, context or ToolContext())
            metadata = {**result.metadata, "images": list(result.images)}
            if result.is_error:
                return ToolOutput(name=self.name, error=result.error, metadata=metadata)
            return ToolOutput(name=self.name, output=result.text, metadata=metadata)

        def forward(self, context: ToolContext | None = None, **arguments: Any):
            return run_sync(self.async_forward(context=context, **arguments))

    Wrapped.__name__ = Wrapped.__qualname__ = f"Rllm{tool_cls.__name__}"
    return Wrapped


def rllm_tool_map(names: list[str] | None = None, configs: Mapping[str, Mapping] | None = None) -> dict[str, type]:
    """``{name: rllm Tool class}`` for ``MultiTool(tool_map=...)``, from our entry points."""
    configs = configs or {}
    return {name: rllm_tool_class(cls, **dict(configs.get(name, {}))) for name, cls in discover_tools(only=names).items()}


def __getattr__(name: str) -> Any:
    if name == "AXPOToolEnv":
        return _env_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

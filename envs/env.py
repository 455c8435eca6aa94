"""``MultimodalToolEnv``: one task, its growing image list, tool calls, and the verified final reward.

The environment is framework-free; the rllm and verl adapters are thin wrappers around it. One
episode's life::

    env = MultimodalToolEnv(tools=["crop", "search"])   # names from the axpo_rllm.tools entry points
    env.reset(task)                                      # task images become images 0..n-1
    obs = env.call_tool("crop", {"image_index": 0, "bbox": [0, 0, 500, 500]})
    obs.image_indices                                    # (n,): later calls can crop the crop
    verdict = env.finish(final_response)                 # the verifier of task.data_source

Why the lock: rllm runs ``env.step`` in a thread pool and a model may emit several calls in one
turn that run concurrently; the image list, counters and the done flag must stay consistent, and
an appended image's index must be the one the model is told. Tool calls themselves run outside the
lock so that slow calls (search, python) overlap.

Sync callers (rllm) get their coroutines run on one process-wide background event loop, so every
environment shares the search tool's HTTP client and concurrency limit instead of building one
per thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Coroutine, Iterable, Mapping, Sequence, TypeVar

from axpo_rllm.envs.images import MAX_ASPECT_RATIO, model_image_problem
from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult
from axpo_rllm.envs.tools.registry import call_tool, discover_tools
from axpo_rllm.envs.verifiers import Grader, VerifyResult
from axpo_rllm.core.records import Task

__all__ = ["MultimodalToolEnv", "Observation", "EnvStateError", "build_tools", "run_sync"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EnvStateError(RuntimeError):
    """The environment was used out of order (a call before ``reset`` or after ``finish``)."""


@dataclass(frozen=True)
class Observation:
    """What one tool call hands back to the agent."""

    tool: str
    """The name the model called (as written, even when unknown)."""
    text: str
    error: str = ""
    """Non-empty: the call failed; :attr:`model_text` shows it to the model as an error."""
    images: tuple[Any, ...] = ()
    """Images this call produced, already appended to the episode's image list."""
    image_indices: tuple[int, ...] = ()
    """Their positions in the episode's image list (what a later ``image_index`` refers to)."""
    metadata: dict = field(default_factory=dict)

    @property
    def is_error(self) -> bool:
        return bool(self.error)

    @property
    def model_text(self) -> str:
        """The observation text the model reads."""
        if self.error:
            return f"Error: {self.error}"
        if self.image_indices and not self.text:
            return f"Returned image(s) {list(self.image_indices)}."
        return self.text


# --------------------------------------------------------------------------------------------
# A process-wide event loop for sync callers


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="axpo-env-loop", daemon=True)
        self.thread.start()


_loop_thread: _LoopThread | None = None
_loop_lock = threading.Lock()


def run_sync(coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    """Run ``coro`` on the shared background loop and wait for it (from any thread without a running loop)."""
    global _loop_thread
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise RuntimeError("run_sync called from a running event loop; await the async method (acall_tool/afinish) instead")
    with _loop_lock:
        if _loop_thread is None:
            _loop_thread = _LoopThread()
        loop = _loop_thread.loop
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)


# --------------------------------------------------------------------------------------------
# Tools


def build_tools(names: Iterable[str] | None = None, configs: Mapping[str, Mapping] | None = None) -> dict[str, Tool]:
    """Instantiate tools by entry-point name (all installed ones when ``names`` is None).

    ``configs`` maps a tool name to its constructor keywords; a config for a tool that is not
    being built is an error (a typo would otherwise be silently ignored).
    """
    configs = dict(configs or {})
    classes = discover_tools(only=None if names is None else list(names))
    stray = sorted(set(configs) - set(classes))
    if stray:
        raise ValueError(f"tool_configs given for {stray}, which are not among the tools {sorted(classes)}")
    return {name: cls(**dict(configs.get(name, {}))) for name, cls in classes.items()}


_SHARED_TOOLS: dict[str, dict[str, Tool]] = {}
_SHARED_LOCK = threading.Lock()


class SharedToolsEnvFactory:
    """A picklable env factory for frameworks that run many episodes per worker process (rllm's
    workflow pool, Ray actors): the tools (sandbox pool, search client and cache) are built once per
    process and configuration, on first use, and every episode gets a fresh env sharing them.

    ``configs``: ``{tool name: constructor keywords}`` (search backend / URL / ``api_key_env`` /
    cache path, sandbox limits and pool size, crop coordinates ...); an ``api_key`` is never taken
    from here (keys come from the environment variable the config names, so they are never logged).
    """

    def __init__(self, names: Sequence[str], configs: Mapping[str, Mapping] | None = None, grader: Grader | None = None,
                 call_timeout_s: float = 120.0) -> None:
        self.names = list(names)
        self.configs = {k: dict(v) for k, v in (configs or {}).items()}
        if any("api_key" in c for c in self.configs.values()):
            raise ValueError("put API keys in an environment variable and name it with 'api_key_env'; a key in the config would be logged")
        self.grader = grader
        self.call_timeout_s = call_timeout_s

    def tools(self) -> dict[str, Tool]:
        key = json.dumps([self.names, self.configs], sort_keys=True, default=str)
        with _SHARED_LOCK:
            if key not in _SHARED_TOOLS:
                _SHARED_TOOLS[key] = build_tools(self.names, self.configs)
            return _SHARED_TOOLS[key]

    def __call__(self) -> "MultimodalToolEnv":
        return MultimodalToolEnv(tools=self.tools(), grader=self.grader, call_timeout_s=self.call_timeout_s)


# --------------------------------------------------------------------------------------------
# The environment


class MultimodalToolEnv:
    """One multimodal task at a time; tool calls through the registry's dispatcher; reward at the end.

    Args:
        task: the first task (or call :meth:`reset` later).
        tools: tool names to build from the ``axpo_rllm.tools`` entry points (default: all), or a
            mapping ``{name: Tool}`` of instances shared with other environments (not closed here).
        tool_configs: ``{name: constructor kwargs}`` for the tools built here.
        grader: a :class:`Grader` (default: one with the process-wide stats).
        call_timeout_s: a tool call still running after this many seconds becomes an error observation.
        max_image_aspect_ratio: a returned image whose long side passes this multiple of its short
            side (or with a side of 0 px, or undecodable) makes the call an error observation: the
            model's processor would refuse it and fail the next request.
    """

    def __init__(
        self,
        task: Task | None = None,
        tools: Iterable[str] | Mapping[str, Tool] | None = None,
        tool_configs: Mapping[str, Mapping] | None = None,
        grader: Grader | None = None,
        call_timeout_s: float = 120.0,
        max_image_aspect_ratio: float = MAX_ASPECT_RATIO,
    ) -> None:
        if isinstance(tools, Mapping):
            if tool_configs:
                raise ValueError("tool_configs only apply to tools built by the env; got tool instances")
            self.tools: dict[str, Tool] = dict(tools)
            self._owns_tools = False
        else:
            self.tools = build_tools(tools, tool_configs)
            self._owns_tools = True
        self.grader = grader if grader is not None else Grader()
        self.call_timeout_s = call_timeout_s
        self.max_image_aspect_ratio = max_image_aspect_ratio
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._images: list[Any] = []
        self._calls: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._result: VerifyResult | None = None
        if task is not None:
            self.reset(task)

    # ---- state -------------------------------------------------------------------------------

    def reset(self, task: Task) -> None:
        """Start an episode on ``task``: its images become the episode's images 0..n-1."""
        if not isinstance(task, Task):
            raise TypeError(f"reset expects an axpo_rllm.core.records.Task, got {type(task).__name__}")
        with self._lock:
            self._task = task
            self._images = list(task.images)
            self._calls.clear()
            self._errors.clear()
            self._result = None

    @property
    def task(self) -> Task:
        with self._lock:
            return self._require_task()

    @property
    def images(self) -> tuple[Any, ...]:
        """Task images, then every image tool calls returned, in order."""
        with self._lock:
            return tuple(self._images)

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.tools))

    def tool_schemas(self) -> list[dict]:
        """OpenAI-style schemas of the configured tools (for the chat template's tools block)."""
        return [self.tools[name].schema() for name in self.tool_names]

    @property
    def done(self) -> bool:
        with self._lock:
            return self._result is not None

    @property
    def result(self) -> VerifyResult | None:
        with self._lock:
            return self._result

    def stats(self) -> dict:
        """``{"tool_calls", "tool_errors", "calls_by_tool", "errors_by_tool"}`` of the current episode."""
        with self._lock:
            return {
                "tool_calls": sum(self._calls.values()),
                "tool_errors": sum(self._errors.values()),
                "calls_by_tool": dict(self._calls),
                "errors_by_tool": dict(self._errors),
            }

    def _require_task(self) -> Task:
        if self._task is None:
            raise EnvStateError("no task: call reset(task) first")
        return self._task

    def _require_open(self) -> Task:
        task = self._require_task()
        if self._result is not None:
            raise EnvStateError(f"episode of task {task.task_id!r} is finished; call reset(task) to start another")
        return task

    # ---- tool calls --------------------------------------------------------------------------

    async def acall_tool(self, name: Any, arguments: Any) -> Observation:
        """Run one parsed tool call (``arguments``: dict or JSON string) and record its outcome."""
        result = await self._execute(name, arguments, self._context())
        return self._record(str(name), result)

    def call_tool(self, name: Any, arguments: Any) -> Observation:
        """Sync :meth:`acall_tool` (for threads without an event loop, e.g. rllm's env executor)."""
        return run_sync(self.acall_tool(name, arguments))

    async def acall_tools(self, calls: Iterable[tuple[Any, Any]]) -> list[Observation]:
        """The ``(name, arguments)`` calls of one turn, run concurrently, recorded in call order.

        All of them see the images as they were before the turn, and new images get indices in the
        order of the calls (not of completion), which is the order the agent shows them to the model.
        """
        calls = list(calls)
        context = self._context()
        results = await asyncio.gather(*(self._execute(name, arguments, context) for name, arguments in calls))
        return [self._record(str(name), result) for (name, _), result in zip(calls, results, strict=True)]

    def call_tools(self, calls: Iterable[tuple[Any, Any]]) -> list[Observation]:
        """Sync :meth:`acall_tools`."""
        return run_sync(self.acall_tools(calls))

    def _context(self) -> ToolContext:
        with self._lock:
            task = self._require_open()
            return ToolContext(images=tuple(self._images), task_id=task.task_id, metadata={"data_source": task.data_source})

    async def _execute(self, name: Any, arguments: Any, context: ToolContext) -> ToolResult:
        try:
            return await asyncio.wait_for(call_tool(self.tools, name, arguments, context), self.call_timeout_s)
        except asyncio.TimeoutError:
            return ToolResult.fail(f"{name} timed out after {self.call_timeout_s:g}s")

    def _checked_images(self, result: ToolResult) -> ToolResult:
        """``result``, or an error result naming the first image the model could not take."""
        for i, image in enumerate(() if result.is_error else result.images):
            problem = model_image_problem(image, self.max_image_aspect_ratio)
            if problem:
                return ToolResult(text=result.text, error=f"returned image {i} cannot be shown to the model: {problem}",
                                  metadata=dict(result.metadata))
        return result

    def _record(self, name: str, result: ToolResult) -> Observation:
        result = self._checked_images(result)
        with self._lock:
            self._require_open()  # finish() may have won a race with this call
            self._calls[name] += 1
            if result.is_error:
                self._errors[name] += 1
                return Observation(tool=name, text=result.text, error=result.error, metadata=dict(result.metadata))
            first = len(self._images)
            self._images.extend(result.images)
            indices = tuple(range(first, len(self._images)))
        return Observation(tool=name, text=result.text, images=tuple(result.images), image_indices=indices, metadata=dict(result.metadata))

    # ---- the final answer --------------------------------------------------------------------

    def finish(self, response: str) -> VerifyResult:
        """Grade the final response with the verifier of ``task.data_source`` and close the episode.

        A grader failure is reward 0 with ``failure`` set (and counted in the grader's stats).
        """
        with self._lock:
            task = self._require_open()
        result = self.grader.grade_task(task, response)
        with self._lock:
            if self._result is not None:
                raise EnvStateError(f"episode of task {task.task_id!r} was finished twice concurrently")
            self._result = result
        return result

    async def afinish(self, response: str) -> VerifyResult:
        """:meth:`finish` off the event loop (grading may block for up to the grader's timeout)."""
        return await asyncio.to_thread(self.finish, response)

    # ---- teardown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the tools this environment built (shared instances belong to their owner)."""
        if self._owns_tools:
            for tool in self.tools.values():
                try:
                    await tool.aclose()
                except Exception as e:  # one tool's failure to close must not leak the others
                    logger.warning("closing tool %r failed: %s", tool.name, e)

    def close(self) -> None:
        run_sync(self.aclose())

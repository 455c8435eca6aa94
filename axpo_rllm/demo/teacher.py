"""The embedded default's programmatic teacher: one demonstration per synthetic task.

AXPO_SPEC §9: ~25% of the trajectories call a tool; only correct answers are kept::

    direct  <think>reasoning</think>\\boxed{answer}<|im_end|>
    tool    <think>reasoning</think><tool_call>{"name": ..., "arguments": ...}</tool_call>
            [the real tool's observation, rendered by the agent's ChatFormat]
            <think>reasoning</think>\\boxed{answer}<|im_end|>

The observations come from running the real tools through the env; SFT itself
(:mod:`axpo_rllm.train.sft`) tokenises and trains on these.
"""

from __future__ import annotations

import json
from typing import Sequence

from axpo_rllm.core.records import Task
from axpo_rllm.demo.world import family_of
from axpo_rllm.envs.env import MultimodalToolEnv
from axpo_rllm.train.sft import TeacherTrajectory

__all__ = ["teacher_trajectory", "teacher_trajectories"]

THINK = {
    "color": "I look at the shape and name its color.",
    "position": "I check which half of the image holds the shape.",
    "size": "I compare the shape with the whole image.",
    "code": "I compute this with python on the image.",
    "search": "I do not know this fact, so I search for it.",
    "crop": "The square is small, so I crop that corner.",
}
THINK_AFTER_TOOL = {
    "code": "The code printed the value.",
    "search": "The first result states the fact.",
    "crop": "The crop shows the square clearly.",
}


def _call_text(name: str, arguments: dict) -> str:
    # The exact form the chat template renders for an assistant tool call.
    return '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (name, json.dumps(arguments, ensure_ascii=False))


def _answer_text(thinking: str, answer: str) -> str:
    return f"<think>\n{thinking}\n</think>\n\\boxed{{{answer}}}"


def teacher_trajectory(task: Task, env: MultimodalToolEnv) -> TeacherTrajectory:
    """Run the teacher on ``task`` with the real tools of ``env`` (a :class:`MultimodalToolEnv`)."""
    family = family_of(task)
    call = task.metadata.get("teacher")
    if call is None:
        return TeacherTrajectory(task, (_answer_text(THINK[family], task.answer),), ())
    env.reset(task)
    obs = env.call_tool(call["name"], call["arguments"])
    if obs.is_error:
        raise RuntimeError(f"teacher call {call} on task {task.task_id} failed: {obs.model_text}")
    first = f"<think>\n{THINK[family]}\n</think>\n" + _call_text(call["name"], call["arguments"])
    return TeacherTrajectory(task, (first, _answer_text(THINK_AFTER_TOOL[family], task.answer)), ((obs.model_text, tuple(obs.images)),))


def teacher_trajectories(tasks: Sequence[Task], env: MultimodalToolEnv) -> list[TeacherTrajectory]:
    return [teacher_trajectory(t, env) for t in tasks]

"""The embedded default's programmatic teacher: one demonstration per synthetic task.

docs/algorithm.md §9: ~25% of the trajectories call a tool; only correct answers are kept::

    direct  <think>reasoning</think>\\boxed{answer}<|im_end|>
    tool    <think>reasoning</think><tool_call>{"name": ..., "arguments": ...}</tool_call>
            [the real tool's observation, rendered by the agent's ChatFormat]
            <think>reasoning</think>\\boxed{answer}<|im_end|>

Tool use is a choice, not a property of the family: with ``direct_share`` (default 0.4) the
teacher answers a tool family's question without the tool (it "knows" the answer; the tiny policy
does not, so the same move is right at about chance level when the policy makes it). The content
of a call varies: crop boxes are jittered around the right quadrant (a box over the wrong corner
shows another colour), so under the SFT policy the call's arguments are a sample too and a wrong
region, code or query gives a wrong answer. Which tasks go direct and each box's jitter are pure
functions of the task id.

The observations come from running the real tools through the env; SFT itself
(:mod:`axpo_rllm.train.sft`) tokenises and trains on these.
"""

from __future__ import annotations

import hashlib
import json
import random
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
THINK_DIRECT = {
    "code": "I can work this out from the image without code.",
    "search": "I think I remember this fact.",
    "crop": "I can see the square without cropping.",
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


def _task_rng(task: Task, salt: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.blake2b(f"{task.task_id}/{salt}".encode(), digest_size=8).digest(), "big"))


def _jitter(call: dict, task: Task) -> dict:
    """A crop box jittered inside its quadrant's margins (it still covers the square)."""
    if call["name"] != "crop":
        return call
    x1, y1, x2, y2 = call["arguments"]["bbox"]
    rng = _task_rng(task, "box")
    box = [x1 + rng.randint(0, 90), y1 + rng.randint(0, 90), x2 - rng.randint(0, 90), y2 - rng.randint(0, 90)]
    return {"name": "crop", "arguments": {**call["arguments"], "bbox": box}}


def _candidate(task: Task, right_call_share: float) -> tuple[dict, str]:
    """A candidate call of a :class:`~axpo_rllm.demo.gap_world.GapWorld` task and the answer its
    observation shows: the right one with probability ``right_call_share``, else one of the
    others uniformly (the teacher looks in the wrong place and reports what it sees there)."""
    meta = task.metadata
    rng = _task_rng(task, "slot")
    right = int(meta["right"])
    slot = right
    if rng.random() >= right_call_share:
        slot = rng.choice([i for i in range(len(meta["calls"])) if i != right])
    return meta["calls"][slot], meta["shows"][slot]


def _direct_answer(task: Task) -> str:
    """The teacher's answer without its tool: the truth, except on a task that lists candidate
    calls (:class:`~axpo_rllm.demo.gap_world.GapWorld`), where the answer cannot be read without the
    right call and the teacher guesses one of the colours the candidates show. SFT then never
    teaches the policy to read such an answer off the image: a direct answer stays a guess."""
    if "calls" not in task.metadata:
        return task.answer
    return _task_rng(task, "guess").choice(list(task.metadata["shows"]))


def teacher_trajectory(task: Task, env: MultimodalToolEnv, direct_share: float = 0.0,
                       right_call_share: float = 1.0) -> TeacherTrajectory:
    """Run the teacher on ``task`` with the real tools of ``env`` (a :class:`MultimodalToolEnv`).

    ``direct_share``: the share of tool-family tasks the teacher answers without its tool (a guess
    where the task lists candidate calls: :func:`_direct_answer`).
    ``right_call_share`` (tasks that list candidate calls, ``metadata["calls"]``): the share of its
    calls that are the right one; after a wrong call it answers what the observation shows, so
    the demonstrations teach reading the observation, not the answer.
    """
    family = family_of(task)
    call = task.metadata.get("teacher")
    if call is None:
        return TeacherTrajectory(task, (_answer_text(THINK[family], task.answer),), ())
    if direct_share > 0 and _task_rng(task, "direct").random() < direct_share:
        return TeacherTrajectory(task, (_answer_text(THINK_DIRECT.get(family, THINK[family]), _direct_answer(task)),), ())
    if "calls" in task.metadata:
        call, answer = _candidate(task, right_call_share)
    else:
        call, answer = _jitter(call, task), task.answer
    env.reset(task)
    obs = env.call_tool(call["name"], call["arguments"])
    if obs.is_error:
        raise RuntimeError(f"teacher call {call} on task {task.task_id} failed: {obs.model_text}")
    first = f"<think>\n{THINK[family]}\n</think>\n" + _call_text(call["name"], call["arguments"])
    return TeacherTrajectory(task, (first, _answer_text(THINK_AFTER_TOOL[family], answer)), ((obs.model_text, tuple(obs.images)),))


def teacher_trajectories(tasks: Sequence[Task], env: MultimodalToolEnv, direct_share: float = 0.0,
                         right_call_share: float = 1.0) -> list[TeacherTrajectory]:
    return [teacher_trajectory(t, env, direct_share, right_call_share) for t in tasks]

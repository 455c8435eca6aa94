"""Real multimodal rollouts for the integration tests: the agent, the transformers engine and the
real crop tool on the tiny Qwen-VL, with whole crop calls inserted (with their true log-probs) by
:class:`~tool_biased_engine.ToolBiasedEngine`, so that episodes run three turns and return images."""

from __future__ import annotations

import asyncio

import numpy as np
from PIL import Image
from tool_biased_engine import ToolBiasedEngine

from axpo_rllm.agents.agent import Agent, AgentConfig
from axpo_rllm.core.records import Task
from axpo_rllm.envs.env import MultimodalToolEnv, build_tools
from axpo_rllm.envs.verifiers import VerifyResult

CALL_TEXT = '<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>'


class WrongGrader:
    def grade_task(self, task, response):
        return VerifyResult(reward=0.0, correct=False, extracted=None)


def noise_task(i: int, with_image: bool = True) -> Task:
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8), "RGB")
    return Task(f"t{i}", f"Which color is the square in picture {i}? Answer A or B.", "A", "choice",
                images=(image,) if with_image else (), metadata={"choices": {"A": "red", "B": "blue"}})


def rollouts(engine, chat):
    """Three rollouts of different lengths (verl #7899: equal-length rows break its 3-D position
    ids): two 3-turn episodes with two crops each (task image + 2 tool images) and a text-only one."""
    # Qwen3-VL-Thinking turns start inside <think>: the inserted call closes the reasoning first.
    start, call = ("<|im_start|>assistant\n<think>\n", "</think>\n\n" + CALL_TEXT) if chat.think_open else ("<|im_start|>assistant\n", CALL_TEXT)
    biased = ToolBiasedEngine(engine, turn_start_ids=chat.encode(start), call_ids=chat.encode(call),
                              open_rate=0.0, call_rate=1.0, open_id=chat.call_open_id)
    env = MultimodalToolEnv(tools=build_tools(["crop"]), grader=WrongGrader())
    out = []
    for i, (task, per_turn) in enumerate([(noise_task(0), 60), (noise_task(1), 50), (noise_task(2, False), 40)]):
        agent = Agent(biased, chat, AgentConfig(max_turns=3, max_tokens_per_turn=per_turn, max_response_tokens=400))
        out.append(asyncio.run(agent.run(env, task, rollout_id=f"r{i}", question_id="q", seed=7 + i)).rollout)
    return out



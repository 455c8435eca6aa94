"""Fixtures for the agent/workflow tests: the tiny Qwen-VL, engines, tasks, a tool-biased engine.

The tiny random model almost never writes a tool call; :class:`ToolBiasedEngine` inserts call
tokens (with their true logprobs) so AXPO triggers, and :class:`AlwaysWrongGrader` marks every
answer wrong (the forced trigger: every tool-using subgroup is all wrong). Every other token is the
model's own sample, so the token-exactness checks are real.
"""

from __future__ import annotations

import importlib.util

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None

from agent_helpers import AlwaysWrongGrader, FakeEngine, biased


@pytest.fixture(scope="session")
def vllm_engine(model_dir):
    if not HAS_VLLM:
        pytest.skip("vllm is not importable here (run in .venv-vllm)")
    from axpo_rllm.engines import VLLMEngine

    engine = VLLMEngine(model_dir, max_model_len=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def chat(tokenizer):
    from axpo_rllm.agents.agent import ChatFormat

    return ChatFormat(tokenizer)


@pytest.fixture(scope="session")
def crop_tools():
    from axpo_rllm.envs.env import build_tools

    return build_tools(["crop"])


@pytest.fixture
def grader():
    return AlwaysWrongGrader()


@pytest.fixture
def env_factory(crop_tools, grader):
    from axpo_rllm.envs.env import MultimodalToolEnv

    return lambda: MultimodalToolEnv(tools=crop_tools, grader=grader)


@pytest.fixture
def fake_engine(chat):
    words = chat.encode(" the red square is left of a blue circle so answer")
    return FakeEngine(chat, words)


@pytest.fixture(scope="session")
def chat_words(chat):
    return chat.encode(" the red square is left of a blue circle so answer")

"""Fixtures for the agent/workflow tests: the tiny Qwen-VL, engines, tasks, a tool-biased engine.

The tiny random model almost never writes a tool call; :class:`ToolBiasedEngine` inserts call
tokens (with their true logprobs) so AXPO triggers, and :class:`AlwaysWrongGrader` marks every
answer wrong (the forced trigger: every tool-using subgroup is all wrong). Every other token is the
model's own sample, so the token-exactness checks are real.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
CALL_TEXT = '<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>'


def noise_image(seed: int, width: int = 84, height: int = 56):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def make_tasks(b: int, with_images: bool = True):
    from axpo_rllm.records import Task

    return [
        Task(f"q{i}", f"Which color is the square in picture {i}? Answer A or B.", "A", "choice",
             images=(noise_image(i),) if with_images else (), metadata={"choices": {"A": "red", "B": "blue"}})
        for i in range(b)
    ]


class AlwaysWrongGrader:
    """A verifier override for tests: every answer is wrong (counts its calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def grade_task(self, task, response):
        from axpo_rllm.envs.verifiers import VerifyResult

        self.calls += 1
        return VerifyResult(reward=0.0, correct=False, extracted=None)


class RecordingEngine:
    """Wraps an engine and keeps every request it served (to check token-exact prompts)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.requests = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request):
        self.requests.append(request)
        return await self.inner.generate(request)

    async def generate_many(self, requests):
        self.requests.extend(requests)
        return await self.inner.generate_many(requests)

    async def score(self, *args):
        return await self.inner.score(*args)


@pytest.fixture(scope="session")
def model_dir():
    from axpo_rllm.tiny_model import tiny_model_dir

    return tiny_model_dir("qwen2_5_vl")


@pytest.fixture(scope="session")
def hf_engine(model_dir):
    from axpo_rllm.engines import TransformersEngine

    engine = TransformersEngine(model_dir)
    yield engine
    engine.close()


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


def biased(engine, chat, **kw):
    from axpo_rllm.agents.testing import ToolBiasedEngine

    return ToolBiasedEngine(engine, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=chat.encode(CALL_TEXT), **kw)

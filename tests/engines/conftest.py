"""Shared fixtures for the engine tests: one tiny model build, one engine of each kind per session.

Engines are expensive to start (vLLM ~15 s in-process, a server ~20-60 s on 2 cores), so each is
session-scoped and shared by every test that asks for it. vLLM-backed fixtures skip when vLLM is
not importable (the main CPU venv); they run in ``.venv-vllm`` (``make test-vllm``).
"""

from __future__ import annotations

import importlib.util

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None


class Prompts:
    """Prompt builders over the tiny model's tokenizer (one unexpanded pad per image)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def ids(self, messages, tools=None) -> tuple[int, ...]:
        out = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
        return tuple(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def text(self, question: str = "How many circles are in the picture? Think first.") -> tuple[int, ...]:
        return self.ids([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}])

    def with_images(self, n_images: int = 1, question: str = "What color is the large square?") -> tuple[int, ...]:
        parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        return self.ids([{"role": "user", "content": parts}])

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)


def noise_image(seed: int, width: int = 84, height: int = 56):
    """A deterministic random RGB image (informative pixels, unlike a flat colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="session")
def tiny_qwen3():
    from axpo_rllm.demo.tiny_model import tiny_model_dir

    return tiny_model_dir("qwen3_vl")


@pytest.fixture(scope="session")
def images():
    return [noise_image(1), noise_image(2, width=100, height=70)]


@pytest.fixture(scope="session")
def prompts(hf_engine):
    return Prompts(hf_engine.tokenizer)


@pytest.fixture(scope="session")
def vllm_engine(model_dir):
    if not HAS_VLLM:
        pytest.skip("vllm is not importable here (run in .venv-vllm: make test-vllm)")
    from axpo_rllm.engines import VLLMEngine

    engine = VLLMEngine(model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_server(model_dir):
    if not HAS_VLLM:
        pytest.skip("vllm is not importable here (run in .venv-vllm: make test-vllm)")
    from axpo_rllm.engines import VLLMServer

    server = VLLMServer(model_dir, extra_args=["--distributed-executor-backend", "uni"])
    server.start(timeout_s=240)
    print(f"vLLM server ready in {server.start_seconds:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http_engine(vllm_server, model_dir):
    from axpo_rllm.engines import HTTPEngine

    return HTTPEngine.for_model(vllm_server.base_url, model_dir)


@pytest.fixture(params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("http", marks=pytest.mark.vllm)])
def engine(request):
    """Each engine in turn, for the contract every engine must meet."""
    name = {"transformers": "hf_engine", "vllm": "vllm_engine", "http": "http_engine"}[request.param]
    return request.getfixturevalue(name)

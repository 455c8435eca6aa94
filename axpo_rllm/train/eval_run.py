"""One ``axpo-rllm eval`` run: the engine, the agent's tools, the resumable samples and the results files.

The command line reads the questions (``axpo_rllm.data``) and hands them here as
:class:`~axpo_rllm.train.evaluate.EvalItem`; this module builds what the samples need, runs
:func:`~axpo_rllm.train.evaluate.evaluate_items` with a fingerprint of everything the samples
depend on (so a resume with other settings is refused), closes the engine and the tools whatever
happens, and writes ``results.md`` and ``results.json`` beside ``samples.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.engines.factory import build_engine
from axpo_rllm.envs.env import MultimodalToolEnv, build_tools, run_sync

from .evaluate import EvalItem, EvalResult, evaluate_items, markdown_table

__all__ = ["tool_configs", "file_stamp", "run_evaluation", "write_results"]


def tool_configs(text: str | None) -> dict:
    """``--tool-config``: a JSON object of tool settings, or ``@FILE`` holding one (empty when not given)."""
    if not text:
        return {}
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--tool-config must be JSON ({{\"search\": {{\"base_url\": ...}}}}) or @FILE: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--tool-config must be a JSON object mapping tool names to their settings")
    return value


def file_stamp(path: str | os.PathLike) -> dict:
    """A data file as the fingerprint sees it: its absolute path, size and modification time."""
    p = os.path.abspath(path)
    st = os.stat(p)
    return {"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _close(engine: Any, tools: Mapping[str, Any]) -> None:
    if engine is not None:
        engine.close()
    for tool in tools.values():
        try:
            run_sync(tool.aclose())
        except Exception:  # noqa: BLE001 - a tool's teardown must not hide the result
            pass


def run_evaluation(
    items: Sequence[EvalItem],
    out: str | os.PathLike,
    *,
    model_dir: str,
    engine: str = "transformers",
    base_url: str | None = None,
    threads: int = 0,
    tools: Sequence[str] = (),
    tool_config: Mapping[str, Any] | None = None,
    agent: AgentConfig | None = None,
    data: Mapping[str, Any] | None = None,
    skip_bad: bool = False,
    **options: Any,
) -> EvalResult:
    """Sample and score ``items`` with the model in ``model_dir`` (:func:`evaluate_items`'s
    ``options``: ``n``, ``k``, ``seed``, ``fresh``, ``record``, ``progress``, ``max_concurrency``).

    ``data``: what the questions were read with (files, source, verifier overrides, ...), part of
    the fingerprint. Raises what building the tools or the engine raises (``ValueError``,
    ``EngineError``, ``OSError``) and lets ``KeyboardInterrupt`` through: the cache keeps the
    finished samples.
    """
    config = dict(tool_config or {})
    built_tools = build_tools(list(tools), config)
    built = None
    try:
        extra = {"threads": threads} if engine == "transformers" and threads else {}
        built = build_engine(engine, model_dir, base_url=base_url, **extra)
        from transformers import AutoTokenizer  # the chat template lives with the model (every engine)

        chat = ChatFormat(getattr(built, "tokenizer", None) or AutoTokenizer.from_pretrained(model_dir))

        def env():
            return MultimodalToolEnv(tools=built_tools)

        fingerprint = {"model_dir": str(Path(model_dir).resolve()), "engine": engine, "base_url": base_url,
                       **dict(data or {}), "tools": list(tools), "tool_schemas": env().tool_schemas(),
                       "tool_config": config, "skip_bad": skip_bad}
        return evaluate_items(built, chat, env, items, agent_config=agent, out_dir=out, fingerprint=fingerprint,
                              skip_bad=skip_bad, **options)
    finally:
        _close(built, built_tools)


def _json_safe(value):
    """NaN (a rate with nothing to count) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out: str | os.PathLike, result: EvalResult, load_report: Mapping[str, Any]) -> str:
    """``results.md`` (the paper's table, returned) and ``results.json`` (scores, counts) in ``out``."""
    out = Path(out)
    table = markdown_table(result.scores)
    (out / "results.md").write_text(table)
    payload = {"scores": result.scores, "load_report": dict(load_report), "skipped_questions": result.skipped,
               "resumed_samples": result.resumed, "samples": len(result.samples)}
    (out / "results.json").write_text(json.dumps(_json_safe(payload), indent=2))
    return table

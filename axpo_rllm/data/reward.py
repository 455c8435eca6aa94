"""verl's reward-function contract for the RL parquet ``axpo-rllm data convert`` writes.

Point verl at this file (``custom_reward_function.path=<this file>``, ``name=compute_score``).
``data_source`` there is the benchmark name (so verl's metrics split by benchmark); the answer
kind travels in ``extra_info.answer_kind`` and picks the verifier, as it does in our own loaders.
A file without it falls back to the benchmark table (:mod:`axpo_rllm.data.sources`). An unknown
source is a configuration error and raises: it must not become a silent zero reward.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from axpo_rllm.envs.verifiers import Grader

from .sources import VerifierMap, grader_source

__all__ = ["compute_score"]

_grader: Grader | None = None


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None, **kwargs: Any) -> dict:
    """``{"score", "acc", "grader_failure"}`` (floats, averaged by verl into step metrics)."""
    global _grader
    if _grader is None:
        _grader = Grader()
    extra = {k: v for k, v in dict(extra_info or {}).items() if v is not None}
    kind = extra.get("answer_kind") or VerifierMap().resolve(str(data_source)).kind
    metadata: dict[str, Any] = {}
    if extra.get("metadata_json"):
        metadata.update(json.loads(extra["metadata_json"]))
    choices = extra.get("choices")
    if choices is not None and len(choices):
        metadata["choices"] = [str(c) for c in choices]
    if kind == "f1":
        metadata["reward"] = "f1"
    if isinstance(ground_truth, (list, tuple)) or hasattr(ground_truth, "tolist"):
        values = list(ground_truth.tolist() if hasattr(ground_truth, "tolist") else ground_truth)
        answer = json.dumps([str(v) for v in values]) if len(values) > 1 else str(values[0])
    else:
        answer = str(ground_truth)
    result = _grader.grade(grader_source(str(kind)), solution_str, answer, metadata)
    return {"score": result.reward, "acc": float(result.correct), "grader_failure": float(result.failure is not None)}

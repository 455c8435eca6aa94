"""The rollout-vs-actor guard: a step whose rollout weights are not the actor's stops.

verl (and rllm's verl backend) compute their ``training/rollout_probs_*`` diagnostics from the
batch that holds both the rollout engine's log-probs of the sampled tokens (``rollout_log_probs``)
and the actor's (``old_log_probs``), once per step, in ``verl.utils.debug.metrics.
calculate_debug_metrics``. This module wraps that function (where verl loads plugins, in every
process; ``wrapt.when_imported``) to apply the failure policy's
:func:`~axpo_rllm.core.failures.check_logprob_gap` to the same batch, and adds
``training/rollout_logprob_gap_mean`` (mean |Δ log p| over response tokens) to the step's metrics.

It is armed only in runs that ask for it: ``axpo-rllm train`` sets ``RLLM_AXPO_MAX_LOGPROB_GAP``
from ``axpo_launch.max_logprob_gap`` (rllm forwards ``RLLM_*`` variables to its Ray workers); other
verl runs in the same environment are left as they are.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import wrapt

from axpo_rllm.core.failures import check_logprob_gap

__all__ = ["LIMIT_ENV", "GAP_METRIC", "logprob_gap", "guard_debug_metrics"]

LIMIT_ENV = "RLLM_AXPO_MAX_LOGPROB_GAP"
GAP_METRIC = "training/rollout_logprob_gap_mean"


def logprob_gap(rollout_log_probs, actor_log_probs, response_mask) -> tuple[float, int]:
    """Mean |Δ log p| over the response tokens of a ``(bs, response_length)`` batch, and their count."""
    mask = response_mask[:, -rollout_log_probs.shape[1]:].bool()
    tokens = int(mask.sum())
    if tokens == 0:
        return 0.0, 0
    return float((rollout_log_probs.float() - actor_log_probs.float()).abs()[mask].mean()), tokens


def _limit() -> float | None:
    value = os.environ.get(LIMIT_ENV, "").strip()
    return float(value) if value else None


def guard_debug_metrics(module: Any) -> None:
    """Wrap ``verl.utils.debug.metrics.calculate_debug_metrics``."""
    original = module.calculate_debug_metrics
    if getattr(original, "_axpo_guarded", False):
        return

    @functools.wraps(original)
    def calculate_debug_metrics(data) -> dict:
        metrics = original(data)
        limit = _limit()
        if limit is None or "rollout_log_probs" not in data.batch or "old_log_probs" not in data.batch:
            return metrics
        mask = data.batch["response_mask"] if "response_mask" in data.batch else data.batch["attention_mask"]
        gap, tokens = logprob_gap(data.batch["rollout_log_probs"], data.batch["old_log_probs"], mask)
        check_logprob_gap(gap, limit, tokens)
        return {**metrics, GAP_METRIC: gap}

    calculate_debug_metrics._axpo_guarded = True  # type: ignore[attr-defined]
    module.calculate_debug_metrics = calculate_debug_metrics


wrapt.when_imported("verl.utils.debug.metrics")(guard_debug_metrics)

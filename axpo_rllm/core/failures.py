"""The failure policy, in one place.

A rollout or continuation that failed (``Termination.ERROR``: an engine error after its retries,
an env or tool crash, a timeout) was cut short by the infrastructure, not by the policy, so:

- it never reaches the loss and is left out of its group's statistics (mean, std): it becomes a
  group of its own with score 0, i.e. advantage 0 (:func:`axpo_rllm.core.advantages.build_training_rows`);
- it is never a source prefix, and a failed continuation is left out of r_prefix: a prefix whose
  continuations all failed earns no credit either way (its source trains as an ordinary rollout);
- it still counts as wrong for the trigger (§1), as it did not answer;
- every step reports the failures by reason (``axpo/failed/<reason>``, the part of ``error`` before
  the first ':') and their share, and a step whose failed share passes ``max_failed_share``
  (default 5%) raises :class:`StepFailedError` listing the reasons — never train silently on an
  outage;
- a step whose sampling policy is not the policy being trained stops too: when the rollout
  engine's log-probs of the sampled tokens differ from the actor's by more than
  ``max_logprob_gap`` on average (mean |Δ log p| over response tokens — a mean, not a max, which
  bf16 kernels alone push to tenths on GPUs), the rollout weights are wrong (a ``dummy``
  ``load_format`` whose buffers no sync sends, a weight sync that did not land) and every
  importance ratio and every advantage of the step is computed on the wrong policy:
  :class:`RolloutPolicyMismatch`.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from axpo_rllm.core.records import Rollout, Termination

__all__ = ["StepFailedError", "RolloutPolicyMismatch", "failed", "failure_reason", "failure_counts", "check_failure_share",
           "check_logprob_gap"]


class StepFailedError(RuntimeError):
    """Too many rollouts of a step failed; the message lists each reason with a count and an example."""


class RolloutPolicyMismatch(RuntimeError):
    """The rollout engine sampled from other weights than the actor trains; the message says where to look."""


def failed(rollout: Rollout) -> bool:
    return rollout.termination is Termination.ERROR


def failure_reason(rollout: Rollout) -> str:
    """The reason's name: the part of ``error`` before the first ':' (e.g. ``EngineError``)."""
    head = rollout.error.split(":", 1)[0].strip()
    return head or "unknown"


def failure_counts(rollouts: Iterable[Rollout]) -> Counter[str]:
    return Counter(failure_reason(r) for r in rollouts if failed(r))


def check_failure_share(rollouts: Iterable[Rollout], max_share: float) -> None:
    """Raise :class:`StepFailedError` when more than ``max_share`` of ``rollouts`` failed."""
    rollouts = list(rollouts)
    bad = [r for r in rollouts if failed(r)]
    if not rollouts or len(bad) / len(rollouts) <= max_share:
        return
    examples: dict[str, str] = {}
    for r in bad:
        examples.setdefault(failure_reason(r), f"{r.rollout_id}: {r.error[:200]}")
    reasons = "; ".join(f"{reason} x{n} (e.g. {examples[reason]})" for reason, n in failure_counts(bad).most_common())
    raise StepFailedError(
        f"{len(bad)} of {len(rollouts)} rollouts failed ({len(bad) / len(rollouts):.1%} > max_failed_share "
        f"{max_share:.1%}): {reasons}"
    )


def check_logprob_gap(mean_gap: float, max_gap: float, tokens: int) -> None:
    """Raise :class:`RolloutPolicyMismatch` when the mean |Δ log p| between the rollout engine and
    the actor over ``tokens`` response tokens passes ``max_gap`` (a NaN gap is a mismatch too)."""
    if tokens > 0 and not mean_gap <= max_gap:
        raise RolloutPolicyMismatch(
            f"the rollout engine's log-probs differ from the actor's by {mean_gap:.3g} on average over {tokens} "
            f"response tokens (limit {max_gap:g}): the rollout server is not running the weights being trained. "
            "Check actor_rollout_ref.rollout.load_format (use 'auto': vLLM versions that fold image normalisation "
            "into the vision tower keep those buffers random under 'dummy', and the weight sync never sends them) "
            "and that the weight sync to the rollout replicas succeeded; raise axpo_launch.max_logprob_gap only if "
            "the precision of your kernels explains the gap"
        )

"""AXPO §6: continuation groups, the recovery reward, masks -> per-token advantages.

Pure functions of the step's records (and tensors); :func:`group_normalize` is GRPO's group
normalisation, vectorised, and is what the verl and rllm estimators call too.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.failures import failed
from axpo_rllm.core.planner import check_continuations
from axpo_rllm.core.records import (
    LossSegment,
    QuestionGroup,
    ResamplePlan,
    Rollout,
    RowRole,
    Termination,
    TrainingRow,
)

__all__ = [
    "group_normalize",
    "group_ids_to_index",
    "build_training_rows",
    "reaches_loss",
    "token_arrays",
    "original_groups",
    "recovery_rewards",
]


# ---------------------------------------------------------------------------------------------
# §6 Advantages.
#   continuation group (per prefix):  A^res_k = (r_k − mean_k r) / (std_k r + ε), continuation tokens only
#   prefix credit:                     r_prefix = max_k r_k, the best continuation's reward
#                                       (0/1 rewards: 1 if any continuation is correct else 0;
#                                       failed continuations left out; all failed: no credit)
#   q's group:                          source reward := r_prefix; mean′, std′ recomputed;
#                                       A^prefix = (r_prefix − mean′) / (std′ + ε) on the prefix tokens only
#   everything else:                    plain GRPO
# ---------------------------------------------------------------------------------------------
def group_normalize(
    scores: torch.Tensor,
    group_index: torch.Tensor,
    *,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO's group normalisation, vectorised: (score − mean_g) / (std_g + ε) per row.

    Args:
        scores: ``(bs,)`` float, one scalar reward per row.
        group_index: ``(bs,)`` int64 in ``[0, G)``, the row's group (``torch.unique(return_inverse=True)``).

    A group of one row gets mean 0 and std 1, exactly as verl's ``compute_grpo_outcome_advantage``
    (Shao et al. 2024, DeepSeekMath, eq. for outcome supervision).
    """
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    counts = torch.bincount(group_index, minlength=num_groups).to(scores.dtype)
    sums = torch.zeros(num_groups, dtype=scores.dtype).index_add_(0, group_index, scores)
    mean = sums / counts
    centred = scores - mean[group_index]
    sq = torch.zeros(num_groups, dtype=scores.dtype).index_add_(0, group_index, centred * centred)
    dof = (counts - 1.0) if unbiased else counts
    std = torch.sqrt(sq / dof.clamp(min=1.0))
    singleton = counts == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    centred = scores - mean[group_index]
    if not norm_by_std:
        return centred
    return centred / (std[group_index] + epsilon)


def group_ids_to_index(group_ids: Iterable[Any]) -> torch.Tensor:
    """Dense group numbers ``[0, G)`` in first-seen order (any hashable ids, e.g. verl's uid objects)."""
    numbering: dict[Any, int] = {}
    return torch.tensor([numbering.setdefault(g, len(numbering)) for g in group_ids], dtype=torch.long)


def build_training_rows(
    groups: Sequence[QuestionGroup],
    plan: ResamplePlan,
    continuations: Sequence[Rollout],
    config: AXPOConfig,
) -> list[TrainingRow]:
    """§6: the step's rows (originals in input order, then each job's continuations) with their
    advantage groups, scores and loss segments.

    Built column by column (one list per field) because a step has thousands of rows.
    """
    by_job = check_continuations(plan, continuations) if plan.jobs else {}
    jobs = {job.source_id: job for job in plan.jobs}
    recovery = recovery_rewards(by_job)
    credit = config.prefix_credit
    keep_tail = config.source_tail == "keep"

    rollouts: list[Rollout] = []
    roles: list[RowRole] = []
    adv_groups: list[str] = []
    scores: list[float] = []
    windows: list[tuple[int, int] | None] = []  # the one window that learns, None: fully masked
    tails: list[int] = []  # source_tail=keep: tokens [tail, n) keep the pre-replacement advantage
    for group in groups:
        for rollout in group.rollouts:
            job = jobs.get(rollout.rollout_id)
            rollouts.append(rollout)
            adv_groups.append(_statistics_group(rollout, rollout.question_id))
            if job is None or not credit or job.prefix_len == 0 or rollout.rollout_id not in recovery:
                roles.append(RowRole.ORDINARY)
                scores.append(0.0 if failed(rollout) else float(rollout.reward))
                windows.append((0, len(rollout.response_ids)) if reaches_loss(rollout) else None)
                tails.append(-1)
            else:
                roles.append(RowRole.SOURCE_PREFIX)
                scores.append(recovery[rollout.rollout_id])  # r_prefix replaces the source's reward
                windows.append((0, job.prefix_len))
                tails.append(job.prefix_len if keep_tail else -1)
    for job in plan.jobs:
        group_id = f"{job.question_id}::{job.source_id}" if config.separate_groups else job.question_id
        for cont in by_job[job.source_id]:
            rollouts.append(cont)
            roles.append(RowRole.CONTINUATION)
            adv_groups.append(_statistics_group(cont, group_id))
            scores.append(0.0 if failed(cont) else float(cont.reward))
            # the prefix is context, not action
            windows.append((job.prefix_len, len(cont.response_ids)) if reaches_loss(cont) else None)
            tails.append(-1)

    norm = dict(epsilon=config.epsilon, norm_by_std=config.norm_by_std, unbiased=config.std_unbiased)
    advantages = group_normalize(torch.tensor(scores, dtype=torch.float32), group_ids_to_index(adv_groups), **norm).tolist()
    tail_adv = pre_replacement_advantages(groups, norm) if keep_tail and plan.jobs else {}
    rows = []
    for rollout, role, adv_group, score, window, tail, adv in zip(rollouts, roles, adv_groups, scores, windows, tails, advantages):
        segments = (LossSegment(window[0], window[1], adv),) if window else ()
        if tail >= 0:
            segments += (LossSegment(tail, len(rollout.response_ids), tail_adv[rollout.rollout_id]),)
        rows.append(TrainingRow(rollout, role, adv_group, score, segments))
    return rows


def recovery_rewards(by_source: Mapping[str, Sequence[Rollout]]) -> dict[str, float]:
    """r_prefix per source: the best reward its continuations reached, max_k r_k. With 0/1 rewards
    this is the paper's "1 if any continuation is correct"; with graded rewards (token F1) it is on
    the scale the source's group is normalised on, so a prefix whose continuations reach 0.9 is not
    scored 0 for missing an exact match. Failure policy (core.failures): failed continuations are
    not evidence about the prefix; a source whose continuations all failed gets no entry (no credit)."""
    out = {}
    for source_id, conts in by_source.items():
        rewards = [float(c.reward) for c in conts if not failed(c)]
        if rewards:
            out[source_id] = max(rewards)
    return out


def _statistics_group(rollout: Rollout, group: str) -> str:
    """The group a row is normalised in: a failed rollout is a group of its own (score 0, so
    advantage 0), which keeps it out of its group's mean and std on every path — here, in verl's
    estimator (one uid per group) and in rllm's (one TrajectoryGroup per group)."""
    return f"{group}::failed::{rollout.rollout_id}" if failed(rollout) else group


def reaches_loss(rollout: Rollout) -> bool:
    """Over-turn (Mini-o3 masking) and failed rollouts never reach the loss: an over-turn episode
    is not a behaviour to push either way (it stays in its group's statistics with its reward), and
    a failed one was cut short by the engine or env, not by the policy (core.failures)."""
    return rollout.termination not in (Termination.OVER_TURN, Termination.ERROR)


def pre_replacement_advantages(groups: Sequence[QuestionGroup], norm: Mapping[str, Any]) -> dict[str, float]:
    """Plain GRPO advantages of the originals (what a source's tail keeps under source_tail=keep)."""
    originals = [r for g in groups for r in g.rollouts]
    scores = torch.tensor([0.0 if failed(r) else float(r.reward) for r in originals], dtype=torch.float32)
    adv = group_normalize(scores, group_ids_to_index([_statistics_group(r, r.question_id) for r in originals]), **norm)
    return {r.rollout_id: a for r, a in zip(originals, adv.tolist())}


def token_arrays(rows: Sequence[TrainingRow], response_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows into ``(advantages, loss_mask)``, each ``(bs, R)``: float32 and int8.

    ``loss_mask`` = the model-token mask restricted to the row's segments; ``advantages`` is each
    segment's advantage on its tokens and 0 elsewhere (already multiplied by the mask).
    """
    lengths = [len(row.rollout.response_ids) for row in rows]
    width = max(lengths, default=0) if response_length is None else response_length
    if lengths and max(lengths) > width:
        raise ValueError(f"a row has {max(lengths)} response tokens, more than response_length={width}")
    loss_mask = np.zeros((len(rows), width), dtype=np.int8)
    values = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        model = row.rollout.response_mask
        for seg in row.segments:
            loss_mask[i, seg.start : seg.end] = model[seg.start : seg.end]
            values[i, seg.start : seg.end] = seg.advantage
    values *= loss_mask
    return torch.from_numpy(values), torch.from_numpy(loss_mask)


def original_groups(rollouts: Iterable[Rollout]) -> list[QuestionGroup]:
    """Group original rollouts by question id, keeping first-seen order."""
    grouped: dict[str, list[Rollout]] = defaultdict(list)
    for r in rollouts:
        grouped[r.question_id].append(r)
    return [QuestionGroup(q, tuple(rs)) for q, rs in grouped.items()]

"""From training rows to a verl ``DataProto`` (the last link of task -> ... -> verl batch).

Columns follow verl's PPO trainer: ``prompts`` (left-padded), ``responses`` (right-padded),
``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask`` (AXPO's loss mask),
``token_level_scores`` / ``token_level_rewards`` (the row's score on its last loss token),
``rollout_log_probs``; non-tensor ``uid`` (the advantage group), ``axpo_role``, ``question_id``,
``rollout_id`` and, when rows carry images, ``multi_modal_data`` (``{"image": [...]}`` per row).

verl's own ``compute_advantage(batch, "axpo", config=...)`` on this batch yields exactly the
per-token advantages of ``axpo_rllm.core.advantages.token_arrays`` (tested).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from verl import DataProto

from axpo_rllm.core.advantages import token_arrays
from axpo_rllm.core.records import TrainingRow

__all__ = ["build_verl_batch"]

PositionIdsFn = Callable[[torch.Tensor, torch.Tensor, Sequence[TrainingRow]], torch.Tensor]


def text_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[TrainingRow]) -> torch.Tensor:
    """1-D positions over the valid tokens (text models). Qwen-VL's M-RoPE needs the processor's
    ``get_rope_index``: pass it as ``position_ids_fn``."""
    return torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)


def build_verl_batch(
    rows: Sequence[TrainingRow],
    *,
    pad_token_id: int,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    position_ids_fn: PositionIdsFn = text_position_ids,
) -> DataProto:
    """Pad the rows into verl's PPO batch layout.

    A row must have at most one loss segment: verl's estimators see one score per row
    (``source_tail=keep`` puts two advantages on one row and is therefore framework-neutral only).
    """
    if not rows:
        raise ValueError("build_verl_batch needs at least one row")
    for row in rows:
        if len(row.segments) > 1:
            raise ValueError(
                f"row {row.rollout.rollout_id} has {len(row.segments)} loss segments with different "
                "advantages; verl's estimator interface carries one score per row, so "
                "source_tail=keep cannot be trained through verl (use source_tail=mask)"
            )
    prompts, prompt_mask = pad_left([row.rollout.prompt_ids for row in rows], pad_token_id, max_prompt_length)
    responses, valid = pad_right([row.rollout.response_ids for row in rows], pad_token_id, max_response_length)
    rollout_logprobs, _ = pad_right([row.rollout.response_logprobs for row in rows], 0.0, responses.shape[1], np.float32)
    loss_mask = token_arrays(rows, responses.shape[1])[1].long()
    scores = score_on_last_loss_token(rows, loss_mask, valid)

    input_ids = torch.cat([prompts, responses], dim=-1)
    attention_mask = torch.cat([prompt_mask, valid], dim=-1)
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_fn(input_ids, attention_mask, rows),
        "response_mask": loss_mask,
        "token_level_scores": scores,
        "token_level_rewards": scores.clone(),
        "rollout_log_probs": rollout_logprobs.float(),
    }
    non_tensors = {
        "uid": np.array([row.adv_group for row in rows], dtype=object),
        "axpo_role": np.array([row.role.value for row in rows], dtype=object),
        "question_id": np.array([row.rollout.question_id for row in rows], dtype=object),
        "rollout_id": np.array([row.rollout.rollout_id for row in rows], dtype=object),
    }
    if any(row.rollout.images for row in rows):
        non_tensors["multi_modal_data"] = np.array(
            [{"image": list(row.rollout.images)} for row in rows], dtype=object
        )
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info={"axpo_rows": len(rows)})


def pad_left(seqs: Sequence[np.ndarray], pad: int, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(s) for s in seqs]
    width = check_width(lengths, width, "prompt")
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


def pad_right(seqs: Sequence[np.ndarray], pad: float, width: int | None, dtype=np.int64) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(s) for s in seqs]
    width = check_width(lengths, width, "response")
    out = np.full((len(seqs), width), pad, dtype=dtype)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


def check_width(lengths: Sequence[int], width: int | None, what: str) -> int:
    longest = max(lengths)
    if width is None:
        return max(longest, 1)
    if longest > width:
        raise ValueError(f"a {what} has {longest} tokens, more than max_{what}_length={width} (truncation would break token-exactness)")
    return width


def score_on_last_loss_token(rows: Sequence[TrainingRow], loss_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The row's score at its last loss token (its last valid token for a fully masked row)."""
    positions = torch.arange(loss_mask.shape[1])
    anchor = torch.where(loss_mask.bool(), positions, -1).max(dim=-1).values
    last_valid = torch.where(valid.bool(), positions, 0).max(dim=-1).values
    anchor = torch.where(anchor >= 0, anchor, last_valid)
    scores = torch.zeros(loss_mask.shape, dtype=torch.float32)
    scores[torch.arange(len(rows)), anchor] = torch.tensor([row.score for row in rows], dtype=torch.float32)
    return scores

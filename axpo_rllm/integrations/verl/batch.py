"""From training rows to a verl ``DataProto`` (the last link of task -> ... -> verl batch).

Columns follow verl's PPO trainer: ``prompts`` (left-padded), ``responses`` (right-padded),
``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask`` (AXPO's loss mask),
``token_level_scores`` / ``token_level_rewards`` (the row's score on its last loss token),
``rollout_log_probs``; non-tensor ``uid`` (the advantage group), ``axpo_role``, ``question_id``,
``rollout_id`` and, when rows carry images, ``multi_modal_data`` (``{"image": [...]}`` per row).

Multimodal rows (``vision=`` a :class:`VisionProcessing`): the rollouts hold one unexpanded
``<|image_pad|>`` per image (the engines' convention); verl's actor needs what verl 0.9.1's agent
loop (``AgentLoopWorker._agent_loop_postprocess``) stores instead, and this builder writes exactly
that, per row:

- ``prompts`` / ``responses`` / ``input_ids``: every pad repeated to its vision-token count (the
  pads of tool images inside observation turns expand inside the response);
- response-aligned columns (``response_mask``, ``rollout_log_probs``, scores) follow the expansion:
  an original token keeps its value at its new position, the added image tokens get 0 (they are
  observation tokens; a model token never sits on an image pad);
- ``position_ids`` (bs, 4, L): row 0 the text positions, rows 1-3 M-RoPE from the model's
  ``get_rope_index``; padding holds 1 in row 0 and 0 in rows 1-3, as verl's
  ``_compute_position_ids`` leaves it;
- non-tensor ``multi_modal_inputs``: one dict per row (``pixel_values``, ``image_grid_thw``,
  ``images_seqlens``; task images then tool images, in token order; ``{}`` for a text-only row).

verl's own ``compute_advantage(batch, "axpo", config=...)`` on this batch yields exactly the
per-token advantages of ``axpo_rllm.core.advantages.token_arrays`` (tested; on a multimodal batch,
at the expanded positions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from verl import DataProto

from axpo_rllm.core.advantages import token_arrays
from axpo_rllm.core.records import TrainingRow
from axpo_rllm.engines.vision import TrainingInputs, training_inputs

__all__ = ["VisionProcessing", "build_verl_batch"]

PositionIdsFn = Callable[[torch.Tensor, torch.Tensor, Sequence[TrainingRow]], torch.Tensor]


def text_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[TrainingRow]) -> torch.Tensor:
    """1-D positions over the valid tokens (text models; Qwen-VL rows take ``vision=``)."""
    return torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)


@dataclass(frozen=True)
class VisionProcessing:
    """What expanding Qwen-VL rows needs: the image processor, the model's ``get_rope_index``
    (``model.model.get_rope_index``, or the method verl binds on its processor) and the pad ids."""

    image_processor: Any
    rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    image_pad_id: int
    video_pad_id: int | None = None

    @classmethod
    def from_model(cls, model: Any, image_processor: Any) -> "VisionProcessing":
        """From a Hugging Face Qwen-VL ``...ForConditionalGeneration`` and its image processor."""
        config = model.config
        return cls(image_processor, model.model.get_rope_index, int(config.image_token_id),
                   getattr(config, "video_token_id", None))

    def expand(self, ids: Sequence[int], images: Sequence[Any]) -> TrainingInputs:
        return training_inputs(ids, images, self.image_processor, self.rope_index,
                               image_pad_id=self.image_pad_id, video_pad_id=self.video_pad_id)


def build_verl_batch(
    rows: Sequence[TrainingRow],
    *,
    pad_token_id: int,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    position_ids_fn: PositionIdsFn = text_position_ids,
    vision: VisionProcessing | None = None,
) -> DataProto:
    """Pad the rows into verl's PPO batch layout.

    With ``vision`` every row is processor-expanded (module docstring) and ``position_ids_fn`` is
    not used; the length limits then count expanded tokens (what verl sees). Without it the ids
    stay as the rollouts hold them, which only a text model can train on: rows with images get a
    warning.

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
    if vision is None:
        if any(row.rollout.images for row in rows):
            warnings.warn(
                "build_verl_batch got rows with images but no vision=VisionProcessing: the ids keep one "
                "unexpanded image pad per image and no multi_modal_inputs are written, so a Qwen-VL actor "
                "cannot train on this batch",
                stacklevel=2,
            )
        prompts, prompt_mask = pad_left([row.rollout.prompt_ids for row in rows], pad_token_id, max_prompt_length)
        responses, valid = pad_right([row.rollout.response_ids for row in rows], pad_token_id, max_response_length)
        rollout_logprobs, _ = pad_right([row.rollout.response_logprobs for row in rows], 0.0, responses.shape[1], np.float32)
        loss_mask = token_arrays(rows, responses.shape[1])[1].long()
        input_ids = torch.cat([prompts, responses], dim=-1)
        attention_mask = torch.cat([prompt_mask, valid], dim=-1)
        position_ids = position_ids_fn(input_ids, attention_mask, rows)
        multi_modal_inputs = None
    else:
        expanded = [expand_row(row, vision) for row in rows]
        prompts, prompt_mask = pad_left([e.prompt_ids for e in expanded], pad_token_id, max_prompt_length)
        responses, valid = pad_right([e.response_ids for e in expanded], pad_token_id, max_response_length)
        width = responses.shape[1]
        _, original_loss_mask = token_arrays(rows)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
        rollout_logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (row, e) in enumerate(zip(rows, expanded)):
            where = torch.from_numpy(e.where)
            loss_mask[i, where] = original_loss_mask[i, : len(where)].long()
            rollout_logprobs[i, where] = torch.from_numpy(row.rollout.response_logprobs)
        input_ids = torch.cat([prompts, responses], dim=-1)
        attention_mask = torch.cat([prompt_mask, valid], dim=-1)
        position_ids = pad_position_ids(
            [e.position_ids for e in expanded], [len(e.prompt_ids) for e in expanded], prompts.shape[1], input_ids.shape[1]
        )
        multi_modal_inputs = [e.multi_modal_inputs for e in expanded]
    scores = score_on_last_loss_token(rows, loss_mask, valid)

    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
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
    if multi_modal_inputs is not None:
        column = np.empty(len(rows), dtype=object)  # np.array(list of dicts) would try to broadcast them
        column[:] = multi_modal_inputs
        non_tensors["multi_modal_inputs"] = column
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info={"axpo_rows": len(rows)})


@dataclass(frozen=True)
class ExpandedRow:
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    where: np.ndarray
    """For every original response token, its index in the expanded ``response_ids``."""
    position_ids: torch.Tensor
    """(4, len(prompt_ids) + len(response_ids))."""
    multi_modal_inputs: dict


def expand_row(row: TrainingRow, vision: VisionProcessing) -> ExpandedRow:
    """One row, processor-expanded, split back into prompt and response."""
    r = row.rollout
    pad = vision.image_pad_id
    pads = np.flatnonzero(r.response_ids == pad)
    in_prompt = int((r.prompt_ids == pad).sum())
    offsets = list(r.image_offsets)
    if offsets != [-1] * in_prompt + pads.tolist():
        raise ValueError(
            f"rollout {r.rollout_id}: image_offsets {tuple(offsets)} do not match its image pads ({in_prompt} in "
            f"the prompt, response positions {pads.tolist()}); expected one unexpanded pad per image, in order"
        )
    if r.response_mask[pads].any():
        raise ValueError(f"rollout {r.rollout_id}: a model token is an image pad (response positions {pads.tolist()})")
    n_prompt = len(r.prompt_ids)
    t = vision.expand(np.concatenate([r.prompt_ids, r.response_ids]).tolist(), r.images)
    cut = t.index[n_prompt - 1] + 1 if n_prompt else 0
    ids = np.asarray(t.input_ids, dtype=np.int64)
    where = np.asarray(t.index[n_prompt:], dtype=np.int64) - cut
    return ExpandedRow(ids[:cut], ids[cut:], where, t.position_ids, t.multi_modal_inputs)


def pad_position_ids(rows: Sequence[torch.Tensor], prompt_lengths: Sequence[int], prompt_width: int, width: int) -> torch.Tensor:
    """(bs, 4, width) from each row's (4, L) positions, placed where its left-padded prompt and
    right-padded response sit (the prompt ends at column ``prompt_width``).

    Padding as verl's ``AgentLoopWorker._compute_position_ids`` leaves it: 1 in the text row,
    0 in the M-RoPE rows (verl drops padding before the forward; kept identical anyway).
    """
    out = torch.zeros((len(rows), 4, width), dtype=torch.long)
    out[:, 0] = 1
    for i, (pos, n_prompt) in enumerate(zip(rows, prompt_lengths)):
        start = prompt_width - n_prompt
        out[i, :, start : start + pos.shape[1]] = pos
    return out


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

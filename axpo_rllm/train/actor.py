"""The actor's forward pass: per-token log-probs of responses given prompts, with images.

One function serves SFT (loss = −log p on assistant tokens) and RL (the actor's ``log_prob`` and
the reference's ``ref_log_prob`` of verl's losses). Sequences are ``prompt_ids + response_ids``
with **one unexpanded** ``<|image_pad|>`` per image (the engines' convention); here each pad is
expanded to its vision-token count and ``mm_token_type_ids`` marks the image tokens, with the
same helpers the engines use (:mod:`axpo_rllm.engines.vision`).

Rows are right-padded; the model computes M-RoPE positions per row from the attention mask.

:func:`batch_logprobs` reads a verl batch instead (``build_verl_batch(..., vision=...)``: ids
already expanded, (bs, 4, L) position ids, per-row ``multi_modal_inputs``), packing each row's
valid tokens to the left first, as verl's engine does after ``left_right_2_no_padding``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from axpo_rllm.engines.vision import expand_image_pads, reset_rope_state, vision_inputs

__all__ = ["Policy", "response_logprobs", "batch_logprobs"]


class Policy:
    """A Qwen-VL module plus what its forward needs (image processor, pad ids)."""

    def __init__(self, model, image_processor, pad_token_id: int) -> None:
        self.model = model
        self.image_processor = image_processor
        self.image_pad_id = int(model.config.image_token_id)
        self.pad_token_id = int(pad_token_id)

    def inputs(self, sequences: Sequence[Sequence[int]], images: Sequence[Sequence[Any]]) -> tuple[dict, list[list[int]]]:
        """Model inputs for a right-padded batch, and per row the expanded index of every
        original token (so that positions in ``sequences`` map to logits)."""
        inputs, counts = vision_inputs(self.image_processor, [im for row in images for im in row])
        pads = iter(counts)
        expanded: list[list[int]] = []
        index: list[list[int]] = []
        for seq, row_images in zip(sequences, images):
            n_pads = sum(1 for t in seq if t == self.image_pad_id)
            if n_pads != len(row_images):
                raise ValueError(f"a row holds {n_pads} image pads but {len(row_images)} images; expected one unexpanded pad per image")
            ids, where = expand_image_pads(seq, self.image_pad_id, pads)
            expanded.append(ids)
            index.append(where)
        width = max(len(ids) for ids in expanded)
        input_ids = torch.full((len(expanded), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(expanded), width), dtype=torch.long)
        for i, ids in enumerate(expanded):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, : len(ids)] = 1
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = attention
        inputs["mm_token_type_ids"] = (input_ids == self.image_pad_id).to(torch.int32)
        return inputs, index


def response_logprobs(
    policy: Policy,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    images: Sequence[Sequence[Any]],
    width: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(bs, width)`` of each response token given the prompt and the response before it.

    Positions past a row's response are 0. Gradients flow unless called under ``torch.no_grad``.
    With ``with_entropy`` also the per-token entropy of the model's distribution (same shape).
    """
    width = width if width is not None else max((len(r) for r in responses), default=0)
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    inputs, index = policy.inputs(sequences, images)
    reset_rope_state(policy.model)
    logits = policy.model(**inputs, use_cache=False).logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    rows, cols, targets, out_rows, out_cols = [], [], [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        where = index[i]
        for j, token in enumerate(r):
            if j >= width:
                break
            pos = where[len(p) + j]  # expanded position of the token; its logit sits one before
            rows.append(i)
            cols.append(pos - 1)
            targets.append(int(token))
            out_rows.append(i)
            out_cols.append(j)
    out = torch.zeros((len(responses), width), dtype=logits.dtype)
    ent = torch.zeros((len(responses), width), dtype=logits.dtype)
    if rows:
        r_t, c_t = torch.tensor(rows), torch.tensor(cols)
        picked = logp_all[r_t, c_t, torch.tensor(targets)]
        out = out.index_put((torch.tensor(out_rows), torch.tensor(out_cols)), picked)
        if with_entropy:
            dist = logp_all[r_t, c_t]
            ent = ent.index_put((torch.tensor(out_rows), torch.tensor(out_cols)), -(dist.exp() * dist).sum(-1).detach())
    return (out, ent) if with_entropy else out


def batch_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    multi_modal_inputs: Sequence[dict] | None,
    prompt_width: int,
    pad_token_id: int,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(bs, R)`` of the response tokens of rows in verl's layout.

    Args:
        input_ids, attention_mask: ``(bs, P + R)``, prompts left-padded to ``prompt_width``,
            responses right-padded (``build_verl_batch``).
        position_ids: ``(bs, 4, P + R)`` (Qwen-VL: text row + M-RoPE) or ``(bs, P + R)``.
        multi_modal_inputs: one dict per row (``pixel_values``, ``image_grid_thw``, ...; ``{}``
            for a text-only row), or None for a text batch.

    Each row's valid tokens are moved to the left (right padding only, so no position attends
    from a padded one), and the vision inputs of the rows are concatenated in row order, which is
    the order the model scatters image features into image tokens. Positions past a row's
    response are 0; gradients flow unless called under ``torch.no_grad``.
    """
    bs, width = input_ids.shape
    valid = attention_mask.bool()
    lengths = valid.sum(-1)
    longest = int(lengths.max())
    ids = torch.full((bs, longest), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((bs, longest), dtype=torch.long)
    three_d = position_ids.dim() == 3
    pos = torch.zeros((bs, position_ids.shape[1], longest) if three_d else (bs, longest), dtype=torch.long)
    for i in range(bs):
        n = int(lengths[i])
        ids[i, :n] = input_ids[i, valid[i]]
        mask[i, :n] = 1
        pos[i, ..., :n] = position_ids[i][..., valid[i]]
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos.transpose(0, 1) if three_d else pos,  # (4, bs, L): the model's layout
    }
    vision = [m for m in (multi_modal_inputs or ()) if m and "pixel_values" in m]
    if vision:
        inputs["pixel_values"] = torch.cat([m["pixel_values"] for m in vision], dim=0)
        inputs["image_grid_thw"] = torch.cat([m["image_grid_thw"] for m in vision], dim=0)
    reset_rope_state(model)
    logits = model(**inputs, use_cache=False).logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    prompt_lengths = attention_mask[:, :prompt_width].sum(-1)
    response_lengths = attention_mask[:, prompt_width:].sum(-1)
    response_width = width - prompt_width
    cols = torch.arange(response_width)
    in_response = cols.unsqueeze(0) < response_lengths.unsqueeze(1)
    # the logit of response token j sits at packed position prompt_length + j - 1
    at = (prompt_lengths.unsqueeze(1) + cols.unsqueeze(0) - 1).clamp(0, longest - 1)
    rows = torch.arange(bs).unsqueeze(1).expand(bs, response_width)
    targets = input_ids[:, prompt_width:]
    picked = logp_all[rows, at].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = torch.where(in_response, picked, torch.zeros_like(picked))
    if not with_entropy:
        return out
    dist = logp_all[rows, at]
    entropy = -(dist.exp() * dist).sum(-1).detach()
    return out, torch.where(in_response, entropy, torch.zeros_like(entropy))

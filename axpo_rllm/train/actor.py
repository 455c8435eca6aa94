"""The actor's forward pass: per-token log-probs of responses given prompts, with images.

One function serves SFT (loss = −log p on assistant tokens) and RL (the actor's ``log_prob`` and
the reference's ``ref_log_prob`` of verl's losses). Sequences are ``prompt_ids + response_ids``
with **one unexpanded** ``<|image_pad|>`` per image (the engines' convention); here each pad is
expanded to its vision-token count and ``mm_token_type_ids`` marks the image tokens, with the
same helpers the engines use (:mod:`axpo_rllm.engines.vision`).

Rows are right-padded; the model computes M-RoPE positions per row from the attention mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from axpo_rllm.engines.vision import expand_image_pads, reset_rope_state, vision_inputs

__all__ = ["Policy", "response_logprobs"]


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

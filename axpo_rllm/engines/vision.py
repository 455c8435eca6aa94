"""Qwen-VL vision helpers shared by the engines and the actor (one implementation each).

- :func:`vision_inputs` + :func:`expand_image_pads`: the prompt convention of every engine is one
  unexpanded ``<|image_pad|>`` per image; a forward pass needs each pad repeated to the image's
  vision-token count (``prod(grid_thw) / merge_size²``) and ``mm_token_type_ids`` marking them
  (Qwen-VL places its M-RoPE positions with it: without it Qwen2-VL/Qwen3-VL raise and Qwen2.5-VL
  drifts by ~6e-4, docs/upstream.md §2).
- :func:`training_inputs`: one training sequence as verl's actor reads it (expanded ids, the
  ``multi_modal_inputs`` verl's agent loop stores, (4, L) position ids computed the way verl's
  ``AgentLoopWorker._compute_position_ids`` computes them).
- :func:`reset_rope_state`: Qwen-VL caches ``rope_deltas`` on the module between calls.
- :func:`banned_ids` / :func:`ban_logit_bias`: ids never sampled (by default the vision pads: a
  random model emits them, which breaks the next turn's image count).

Pure Python over what the caller passes (the processor, the model): importable without torch and
transformers (the HTTP engine needs neither); :func:`training_inputs` imports torch when called.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Sequence

__all__ = [
    "BAN_LOGIT_BIAS",
    "load_image_processor",
    "image_token_count",
    "rgb",
    "vision_inputs",
    "expand_image_pads",
    "TrainingInputs",
    "training_inputs",
    "reset_rope_state",
    "banned_ids",
    "ban_logit_bias",
]

BAN_LOGIT_BIAS = -100.0
"""vLLM clamps logit biases to [-100, 100]; -100 puts a banned id at exp(-100) ~ 4e-44 of the
mass, below float32's resolution next to any real token, so it is never sampled."""


def load_image_processor(model_dir: Any) -> Any:
    """The model's image processor, without torchvision when it is missing.

    ``AutoProcessor`` needs torchvision (the video processor); the main CPU venv has none, so fall
    back to the PIL implementation of the same Qwen2-VL image processor. With torchvision present
    the processor vLLM itself uses is taken, so every engine sees identical pixels.
    """
    try:
        from transformers import AutoProcessor  # heavy; imports torchvision's video processor: may fail

        return AutoProcessor.from_pretrained(model_dir).image_processor
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # heavy

        return Qwen2VLImageProcessorPil.from_pretrained(model_dir)


def image_token_count(image_processor: Any, image: Any) -> int:
    """How many tokens one ``<|image_pad|>`` becomes for ``image``: the processor's own resize
    rule (``get_number_of_image_patches``) over the merger (``merge_size²``), without processing
    pixels."""
    width, height = image.size
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return int(patches) // int(image_processor.merge_size) ** 2


def rgb(image: Any) -> Any:
    """The image in RGB (the processors' input mode)."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def vision_inputs(image_processor: Any, images: Sequence[Any]) -> tuple[dict, list[int]]:
    """``pixel_values`` / ``image_grid_thw`` for ``images`` (in order) and each image's
    vision-token count after the merger (empty dict and list for no images)."""
    if not images:
        return {}, []
    vision = image_processor(images=[rgb(im) for im in images], return_tensors="pt")
    merge = int(image_processor.merge_size) ** 2
    counts = [int(g.prod()) // merge for g in vision["image_grid_thw"]]
    return {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}, counts


def expand_image_pads(ids: Sequence[int], image_pad_id: int, counts: Iterator[int]) -> tuple[list[int], list[int]]:
    """Repeat each image pad of ``ids`` to its count (drawn from ``counts`` in order).

    Returns the expanded ids and, for every original position, its index in the expanded
    sequence (a pad maps to its last copy, so the token after it keeps its logit position).
    Raises ValueError when ``counts`` runs out before the pads do.
    """
    expanded: list[int] = []
    where: list[int] = []
    for t in ids:
        if t == image_pad_id:
            n = next(counts, None)
            if n is None:
                raise ValueError("more image pads than images: expected one unexpanded pad per image")
            expanded.extend([int(t)] * n)
            where.append(len(expanded) - 1)
        else:
            where.append(len(expanded))
            expanded.append(int(t))
    return expanded, where


class TrainingInputs(NamedTuple):
    """One processor-expanded training sequence (see :func:`training_inputs`)."""

    input_ids: list[int]
    """The sequence with every image pad repeated to its vision-token count (length L)."""
    index: list[int]
    """For every position of the unexpanded sequence, its position in ``input_ids`` (a pad maps to
    its last copy)."""
    multi_modal_inputs: dict
    """``pixel_values``, ``image_grid_thw`` and ``images_seqlens`` (patches per image frame), the
    keys verl 0.9.1's agent loop stores per row; empty for a sequence without images."""
    position_ids: Any
    """``torch.LongTensor`` (4, L): row 0 the text positions 0..L-1, rows 1-3 the M-RoPE
    (temporal, height, width) positions from the model's ``get_rope_index``."""


def training_inputs(
    ids: Sequence[int],
    images: Sequence[Any],
    image_processor: Any,
    rope_index: Callable[..., tuple[Any, Any]],
    *,
    image_pad_id: int,
    video_pad_id: int | None = None,
) -> TrainingInputs:
    """What verl's Qwen-VL actor needs for ``ids`` (prompt + response, one unexpanded pad per image).

    ``images`` are the sequence's images in token order (task images, then tool outputs);
    ``rope_index`` is the model's ``get_rope_index`` (``model.model.get_rope_index``, or the
    processor method verl binds in ``verl.utils.tokenizer.hf_processor``), called exactly as
    verl's ``AgentLoopWorker._compute_position_ids`` calls it: ``mm_token_type_ids`` 1 on image
    pads (2 on video pads), ``image_grid_thw`` from ``image_processor``. Raises ValueError when
    the pads and the images do not pair up one to one.
    """
    import torch  # only here: the module itself must import without torch

    n_pads = sum(1 for t in ids if t == image_pad_id)
    if n_pads != len(images):
        raise ValueError(
            f"the sequence holds {n_pads} image pads but {len(images)} images were given; expected one "
            "unexpanded <|image_pad|> per image, in order"
        )
    vision, counts = vision_inputs(image_processor, images)
    expanded, index = expand_image_pads(ids, image_pad_id, iter(counts))
    input_ids = torch.tensor([expanded], dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[input_ids == image_pad_id] = 1
    if video_pad_id is not None:
        mm_token_type_ids[input_ids == video_pad_id] = 2
    grid = vision.get("image_grid_thw")
    rope, _ = rope_index(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_grid_thw=grid,
        video_grid_thw=None,
        mm_token_type_ids=mm_token_type_ids,
    )
    text = torch.arange(len(expanded), dtype=torch.long).unsqueeze(0)
    position_ids = torch.cat([text, rope[:, 0].to(torch.long)], dim=0)
    multi_modal_inputs = dict(vision)
    if grid is not None:
        multi_modal_inputs["images_seqlens"] = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return TrainingInputs(expanded, index, multi_modal_inputs, position_ids)


def first_images(multi_modal_inputs: dict, n: int) -> dict:
    """The inputs of the first ``n`` images of ``multi_modal_inputs`` (pixel rows, grids, seqlens
    are per image, in order): what a row cut before the later images needs."""
    grid = multi_modal_inputs.get("image_grid_thw")
    if grid is None or n >= len(grid):
        return dict(multi_modal_inputs) if n else {}
    if n == 0:
        return {}
    rows = int((grid[:n, 0] * grid[:n, 1] * grid[:n, 2]).sum())
    frames = int(grid[:n, 0].sum())
    out = dict(multi_modal_inputs)
    out["pixel_values"] = multi_modal_inputs["pixel_values"][:rows]
    out["image_grid_thw"] = grid[:n]
    if "images_seqlens" in out:
        out["images_seqlens"] = multi_modal_inputs["images_seqlens"][:frames]
    return out


def reset_rope_state(model: Any) -> None:
    """Forget the M-RoPE offset Qwen-VL cached on the module during the previous call.

    Qwen-VL keeps ``rope_deltas`` between calls and reuses it for cached decoding: a text-only
    request after an image request would otherwise decode at the image request's positions, and
    a training forward must compute its own positions.
    """
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


def banned_ids(requested: Sequence[int] | None, image_pad_id: int, video_pad_id: int) -> tuple[int, ...]:
    """The request's banned ids, or the default (the image and video pads) when it names none."""
    return (image_pad_id, video_pad_id) if requested is None else tuple(int(t) for t in requested)


def ban_logit_bias(requested: Sequence[int] | None, image_pad_id: int, video_pad_id: int) -> dict[int, float]:
    """vLLM's ``logit_bias`` that bans :func:`banned_ids` (empty when nothing is banned)."""
    return {t: BAN_LOGIT_BIAS for t in banned_ids(requested, image_pad_id, video_pad_id)}

"""Two verl defects on the multimodal training path, mended where verl loads plugins.

verl imports every ``verl.plugins`` entry point on ``import verl``, in every process (Ray actors
included), so the mends below are in place wherever verl's actor runs. Each waits for the verl module
it mends (``wrapt.when_imported``): a process that never imports it pays nothing. Both are
*idempotent* — they rebuild a value the way verl's own later code expects, so a verl release that
fixes the defect gets the same value back — and both were reproduced with verl 0.8.0 and 0.9.1's own
functions (``tests/integrations/test_verl_upstream_fixes.py``).

1. **3-D position ids in the no-padding conversion** (verl issue #7899; PRs #7349, #7901 open).
   ``verl.workers.utils.padding.left_right_2_no_padding`` packs each row's ``(C, L_i)`` M-RoPE
   position ids with ``torch.nested.as_nested_tensor``, which picks the component axis as the ragged
   one when every row has the same length — a micro-batch of one row included. The tensor is then
   malformed (``values`` of shape ``(B·C, L)``) and verl's ``maybe_fix_3d_position_ids`` turns it into
   one whose next ``unbind`` raises ``split_with_sizes``. Mended: the position ids are rebuilt with
   verl's own ``nested_tensor_from_tensor_list(rows, ragged_idx=2)`` (token axis ragged).
2. **All-text micro-batches on Qwen2-VL / Qwen2.5-VL** (``verl/models/transformers/qwen2_vl.py``,
   ``_get_input_embeds``): with no image in a micro-batch verl runs the vision tower on a dummy
   patch so its parameters join the backward pass, then calls ``.mean()`` on the tower's output —
   an output *object* under transformers 5.x, so the step raises ``AttributeError``. Mended: for
   that call only, a forward hook hands back the tower's embeddings through verl's own
   ``unpack_visual_output``.
"""

from __future__ import annotations

import functools
from typing import Any

import wrapt

__all__ = ["mend_position_ids", "mend_all_text_embeds"]


def _rows_of(position_ids, attention_mask) -> list:
    """Each row's position ids over its valid tokens: ``(C, L_i)``."""
    return [position_ids[i][:, attention_mask[i].bool()] for i in range(position_ids.shape[0])]


def mend_position_ids(module: Any) -> None:
    """Fix 1 on ``verl.workers.utils.padding``."""
    original = module.left_right_2_no_padding
    if getattr(original, "_axpo_mended", False):
        return
    from verl.utils.tensordict_utils import nested_tensor_from_tensor_list

    @functools.wraps(original)
    def left_right_2_no_padding(data):
        position_ids, attention_mask = data["position_ids"], data["attention_mask"]
        out = original(data)
        if position_ids.dim() == 3:  # (bs, C, L): M-RoPE; the token axis must stay ragged
            out["position_ids"] = nested_tensor_from_tensor_list(_rows_of(position_ids, attention_mask), ragged_idx=2)
        return out

    left_right_2_no_padding._axpo_mended = True  # type: ignore[attr-defined]
    module.left_right_2_no_padding = left_right_2_no_padding


def mend_all_text_embeds(module: Any) -> None:
    """Fix 2 on ``verl.models.transformers.qwen2_vl``."""
    original = module._get_input_embeds
    if getattr(original, "_axpo_mended", False):
        return
    from verl.utils.transformers_compat import unpack_visual_output

    @functools.wraps(original)
    def _get_input_embeds(model, input_ids, attention_mask=None, pixel_values=None, pixel_values_videos=None,
                          image_grid_thw=None, video_grid_thw=None):
        if pixel_values is not None or pixel_values_videos is not None:
            return original(model, input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw,
                            video_grid_thw)
        hook = model.visual.register_forward_hook(lambda _m, _i, output: unpack_visual_output(output)[0])
        try:
            return original(model, input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw,
                            video_grid_thw)
        finally:
            hook.remove()

    _get_input_embeds._axpo_mended = True  # type: ignore[attr-defined]
    module._get_input_embeds = _get_input_embeds


wrapt.when_imported("verl.workers.utils.padding")(mend_position_ids)
wrapt.when_imported("verl.models.transformers.qwen2_vl")(mend_all_text_embeds)

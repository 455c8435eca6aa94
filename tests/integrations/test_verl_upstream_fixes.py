"""verl's two multimodal defects, reproduced with verl's own functions, and their mends.

Each case runs in a fresh interpreter twice: with every ``verl.plugins`` entry point (the mends in
``axpo_rllm.integrations.verl.upstream_fixes`` load with them) and with only the estimator
(``VERL_USE_EXTERNAL_PLUGINS=axpo``), which is verl as shipped. The second must fail as verl fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("verl")

POSITION_IDS = textwrap.dedent("""
    import torch
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils import padding

    def batch(lengths, L=6, C=4):
        am = torch.zeros(len(lengths), L, dtype=torch.long)
        for i, n in enumerate(lengths):
            am[i, L - n:] = 1
        pos = torch.arange(C * L).reshape(1, C, L).repeat(len(lengths), 1, 1) + 100 * torch.arange(len(lengths)).reshape(-1, 1, 1)
        td = TensorDict({"input_ids": torch.arange(am.numel()).reshape(am.shape), "attention_mask": am,
                         "response_mask": am[:, -3:], "position_ids": pos}, batch_size=[len(lengths)])
        return td, pos, am

    for lengths in ([5, 3], [4, 4], [4], [6, 6, 6]):
        td, pos, am = batch(lengths)
        out = padding.left_right_2_no_padding(td)
        tu.maybe_fix_3d_position_ids(out)  # what verl's workers do on receipt
        rows = out["position_ids"].unbind()
        assert len(rows) == len(lengths)
        for i, row in enumerate(rows):
            assert torch.equal(row, pos[i][:, am[i].bool()]), (lengths, i)
    print("POSITION_IDS_OK")
""")

ALL_TEXT = textwrap.dedent("""
    import torch
    from transformers import AutoModelForImageTextToText
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from verl.models.transformers import qwen2_vl

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_5_vl", 0))
    inner = getattr(model, "model", model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    embeds, _ = qwen2_vl._get_input_embeds(inner, ids, torch.ones_like(ids))
    assert torch.allclose(embeds, inner.get_input_embeddings()(ids))  # + 0 * the tower's mean
    embeds.sum().backward()
    assert all(p.grad is not None for p in inner.visual.parameters()), "the tower joins the backward pass"
    print("ALL_TEXT_OK")
""")


def _run(code: str, plugins: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    if plugins is not None:
        env["VERL_USE_EXTERNAL_PLUGINS"] = plugins
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("code, ok, fails_with", [
    (POSITION_IDS, "POSITION_IDS_OK", "RuntimeError"),
    (ALL_TEXT, "ALL_TEXT_OK", "has no attribute 'mean'"),
], ids=["position_ids_equal_lengths", "all_text_micro_batch"])
def test_verl_defect_is_mended_where_verl_loads_plugins(code, ok, fails_with):
    mended = _run(code, None)
    assert ok in mended.stdout, mended.stderr[-3000:]
    shipped = _run(code, "axpo")  # verl as shipped: only the estimator plugin
    assert ok not in shipped.stdout and fails_with in shipped.stderr, shipped.stderr[-3000:]


def test_the_mends_wrap_once():
    from verl.workers.utils import padding

    from axpo_rllm.integrations.verl.upstream_fixes import mend_position_ids

    before = padding.left_right_2_no_padding
    mend_position_ids(padding)
    assert padding.left_right_2_no_padding is before and getattr(before, "_axpo_mended", False)

"""Issue 9, defect 2 on the rllm path: the trajectories the AXPO workflow hands rllm carry the same
processor-expanded ids and multimodal inputs as the verl batch of the same rows.

rllm's own ``transform_trajectory_groups_to_dataproto`` (its verl backend's trajectory → batch
step) is run on the grouping hook's output and compared row by row with ``build_verl_batch``.
Needs rllm (skips in CI; run in a throwaway venv with rllm)."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("rllm")

from multimodal_rollouts import rollouts  # noqa: E402  (tests/support)
from rllm.trainer.verl.transform import transform_trajectory_groups_to_dataproto  # noqa: E402
from rllm.types import Episode  # noqa: E402

from axpo_rllm.agents.chat_format import ChatFormat  # noqa: E402
from axpo_rllm.core.advantages import build_training_rows  # noqa: E402
from axpo_rllm.core.config import AXPOConfig  # noqa: E402
from axpo_rllm.core.planner import plan_resampling  # noqa: E402
from axpo_rllm.core.records import QuestionGroup  # noqa: E402
from axpo_rllm.integrations.rllm.workflow import axpo_traj_grouping_hook, rollout_to_trajectory  # noqa: E402
from axpo_rllm.integrations.verl.batch import VisionProcessing, build_verl_batch  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.rllm]


def unpadded(batch, i):
    prompt = batch.batch["prompts"][i][batch.batch["attention_mask"][i][: batch.batch["prompts"].shape[1]].bool()]
    n = batch.batch["responses"].shape[1]
    valid = batch.batch["attention_mask"][i][-n:].bool()
    return prompt.tolist(), batch.batch["responses"][i][valid].tolist(), batch.batch["response_mask"][i][valid].tolist()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_hook_trajectories_equal_the_verl_batch(family):
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from axpo_rllm.engines import TransformersEngine

    engine = TransformersEngine(tiny_model_dir(family))
    try:
        chat = ChatFormat(engine.tokenizer)
        ros = rollouts(engine, chat)
        assert sum(len(r.images) for r in ros) == 6, "two 3-turn rollouts with two crops each"
        vision = VisionProcessing.from_model(engine.model, engine.image_processor)
        cfg = AXPOConfig(enable=False)
        group = QuestionGroup("q", tuple(ros))
        plan = plan_resampling([group], cfg)
        trajectories = [rollout_to_trajectory(r, inputs=vision.expand(list(r.prompt_ids) + list(r.response_ids), r.images)
                                              if r.images else None) for r in ros]
        episode = Episode(id="q:0", task={}, trajectories=trajectories,
                          metadata={"axpo_plan": plan, "axpo_config": cfg, "axpo_step": 0})
        groups = axpo_traj_grouping_hook([episode])
        n_prompt = max(len(r.prompt_ids) for r in ros) + 200
        theirs = transform_trajectory_groups_to_dataproto(
            groups, types.SimpleNamespace(tokenizer=engine.tokenizer, processor=None), n_prompt, 2048)
        ours = build_verl_batch(build_training_rows([group], plan, [], cfg), pad_token_id=engine.tokenizer.pad_token_id, vision=vision)
        assert len(theirs) == len(ours) == 3
        rows_ours = {tuple(unpadded(ours, i)[0] + unpadded(ours, i)[1]): i for i in range(len(ours))}
        for j in range(len(theirs)):
            p, r, m = unpadded(theirs, j)
            i = rows_ours[tuple(p + r)]  # same expanded ids, row for row
            assert (p, r, m) == unpadded(ours, i)
            mm_ours = ours.non_tensor_batch["multi_modal_inputs"][i] or {}
            mm_theirs = (theirs.non_tensor_batch.get("multi_modal_inputs", [{}] * len(theirs))[j]) or {}
            assert set(mm_ours) == set(mm_theirs)
            for key in mm_ours:
                assert torch.equal(torch.as_tensor(mm_ours[key]), torch.as_tensor(mm_theirs[key])), key
            n_image_tokens = sum(t == chat.image_pad_id for t in p + r)
            if mm_ours:
                grid = mm_ours["image_grid_thw"]
                assert n_image_tokens == int((grid.prod(-1) // 4).sum()) and len(grid) == 3
    finally:
        engine.close()


def test_a_rollout_with_images_needs_the_expanded_inputs():
    from synthetic_rollouts import make_rollout

    ro = make_rollout("a", "q", correct=False)
    ro = type(ro)(**{**{f: getattr(ro, f) for f in ro.__dataclass_fields__}, "images": ("img",), "image_offsets": (-1,)})
    with pytest.raises(ValueError, match="refers to 1 image"):
        rollout_to_trajectory(ro)

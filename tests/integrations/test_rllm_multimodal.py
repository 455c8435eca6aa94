"""Issue 9, defect 2 on the rllm path: the trajectories the AXPO workflow hands rllm carry the same
processor-expanded ids and multimodal inputs as the verl batch of the same rows.

rllm's own ``transform_trajectory_groups_to_dataproto`` (its verl backend's trajectory → batch
step) is run on the grouping hook's output and compared row by row with ``build_verl_batch``.
Needs rllm (skips in CI; run in a throwaway venv with rllm)."""

from __future__ import annotations

import asyncio
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


def test_a_training_and_a_validation_step_with_images_through_rllms_engine():
    """rllm's ``UnifiedWorkflowEngine`` runs our workflow on the tiny Qwen2.5-VL with crop images:
    a training step (the shared plan, continuations, the step's diagnostics in every episode) and a
    validation step (plain rollouts), then rllm's transform builds a batch with every image."""
    from rllm.engine.unified_workflow_engine import UnifiedWorkflowEngine
    from tool_biased_engine import ToolBiasedEngine

    from axpo_rllm.agents.agent import AgentConfig
    from axpo_rllm.agents.workflow import WorkflowConfig
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from axpo_rllm.engines import TransformersEngine
    from axpo_rllm.envs.env import SharedToolsEnvFactory
    from axpo_rllm.integrations.rllm.workflow import AXPORllmWorkflow, AXPOStepCoordinator, AxpoRllmEngine
    from multimodal_rollouts import CALL_TEXT, noise_task

    engine = TransformersEngine(tiny_model_dir("qwen2_5_vl"))
    try:
        chat = ChatFormat(engine.tokenizer)
        biased = ToolBiasedEngine(engine, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=chat.encode(CALL_TEXT),
                                  open_rate=0.0, call_rate=0.6, open_id=chat.call_open_id)
        config = WorkflowConfig(n=4, axpo=AXPOConfig(r=0.5, k=2, max_failed_share=0.25),
                                agent=AgentConfig(max_turns=3, max_tokens_per_turn=60, max_response_tokens=400), seed=3)

        class Wrong:  # every answer wrong: tool subgroups are all wrong, so AXPO triggers
            def grade_task(self, task, response):
                from axpo_rllm.envs.verifiers import VerifyResult

                return VerifyResult(reward=0.0, correct=False, extracted=None)

        coordinator = AXPOStepCoordinator(2, config.axpo, barrier_timeout_s=120)
        vision = VisionProcessing.from_model(engine.model, engine.image_processor)
        wf_engine = UnifiedWorkflowEngine(
            AXPORllmWorkflow,
            {"coordinator": coordinator, "chat": chat, "env_factory": SharedToolsEnvFactory(["crop"], grader=Wrong()),
             "config": config, "vision": vision},
            AxpoRllmEngine(biased, chat), n_parallel_tasks=2, retry_limit=1, raise_on_error=True,
        )
        tasks = [noise_task(i) for i in range(2)]
        dicts = [{"task_id": t.task_id, "question": t.question, "answer": t.answer, "data_source": t.data_source,
                  "images": list(t.images), "choices": t.metadata["choices"]} for t in tasks]
        episodes = asyncio.run(wf_engine.execute_tasks(dicts, [d["task_id"] for d in dicts]))
        assert coordinator.step == 1 and episodes[0].metadata["axpo_plan"].jobs, "the step planned continuations"
        assert len({ep.metrics["axpo/triggered_questions"] for ep in episodes}) == 1
        groups = axpo_traj_grouping_hook(episodes)
        batch = transform_trajectory_groups_to_dataproto(groups, types.SimpleNamespace(tokenizer=engine.tokenizer, processor=None), 2048, 2048)
        mm = batch.non_tensor_batch["multi_modal_inputs"]
        for i in range(len(batch)):
            p, r, _ = unpadded(batch, i)
            n_tokens = sum(t == chat.image_pad_id for t in p + r)
            grid = (mm[i] or {}).get("image_grid_thw")
            assert n_tokens == (int((grid.prod(-1) // 4).sum()) if grid is not None else 0), "every image's features travel"

        val_dicts = [d for d in dicts for _ in range(2)]
        val = asyncio.run(wf_engine.execute_tasks(val_dicts, [d["task_id"] for d in val_dicts], is_validation=True))
        assert coordinator.step == 1 and all(len(ep.trajectories) == 1 for ep in val)
        assert sorted(len(g.trajectories) for g in axpo_traj_grouping_hook(val)) == [2, 2]
    finally:
        engine.close()

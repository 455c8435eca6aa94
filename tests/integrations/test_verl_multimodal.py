"""Multimodal rows through verl 0.9.1's own actor code on CPU, for the tiny Qwen2.5-VL and Qwen3-VL.

A real rollout (the agent, the transformers engine, the real crop tool; whole crop calls inserted
with their true log-probs by ``ToolBiasedEngine``) -> ``build_verl_batch(vision=...)`` -> the way
verl's trainer computes old log-probs (``RayPPOTrainer._compute_old_log_prob``):
``DataProto.to_tensordict`` -> ``left_right_2_no_padding`` -> ``FSDPEngineWithLMHead.infer_batch``
(``prepare_micro_batches`` -> ``forward_step`` -> ``prepare_model_inputs`` / the model /
``prepare_model_outputs``, ``use_remove_padding=False``, fp32) with the model forward verl's
``apply_monkey_patch`` installs -> ``no_padding_2_padding``. It must reproduce the rollout's
log-probs on every loss token.

What differs from a GPU run, and why: verl picks its CUDA platform on a CPU machine (its
``get_device_id`` then fails), so the test installs a CPU platform through verl's own
``set_platform``; the module is the Hugging Face model itself, not an FSDP wrapper of it (one rank:
FSDP changes no arithmetic); the engine object is made without ``__init__`` (which builds device
meshes and loads weights from a checkpoint) and given the attributes its forward path reads.

Also checked against verl's agent loop itself: ``AgentLoopWorker._compute_multi_modal_inputs`` and
``_compute_position_ids`` (with the model's ``get_rope_index`` bound to a real Qwen processor the
way ``verl.utils.tokenizer.hf_processor`` binds it) give exactly our ``multi_modal_inputs`` and
position ids, row by row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

import verl.utils.torch_functional as verl_F  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: E402
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_cuda import PlatformCUDA  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPEngineConfig  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402

from axpo_rllm.core.advantages import build_training_rows, token_arrays  # noqa: E402
from axpo_rllm.core.config import AXPOConfig  # noqa: E402
from axpo_rllm.core.planner import plan_resampling  # noqa: E402
from axpo_rllm.core.records import QuestionGroup, Task  # noqa: E402
from axpo_rllm.integrations.verl.batch import VisionProcessing, build_verl_batch  # noqa: E402
from multimodal_rollouts import rollouts  # noqa: E402  (tests/support)

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def case(request):
    from axpo_rllm.agents.agent import ChatFormat
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from axpo_rllm.engines import TransformersEngine

    engine = TransformersEngine(tiny_model_dir(request.param))
    chat = ChatFormat(engine.tokenizer)
    ros = rollouts(engine, chat)
    a, b, text = ros
    assert a.turns == b.turns == 3 and len(a.tool_calls) == len(b.tool_calls) == 2
    assert len(a.images) == len(b.images) == 3 and a.image_offsets[0] == -1 and min(a.image_offsets[1:]) >= 0
    assert not text.images and len({len(r.response_ids) for r in ros}) == 3
    # one correct rollout so that the group's advantages are not all zero
    ros[0] = dataclasses.replace(a, reward=1.0, correct=True)
    cfg = AXPOConfig(enable=False)
    group = QuestionGroup("q", tuple(ros))
    rows = build_training_rows([group], plan_resampling([group], cfg), [], cfg)
    vision = VisionProcessing.from_model(engine.model, engine.image_processor)
    batch = build_verl_batch(rows, pad_token_id=engine.tokenizer.pad_token_id, vision=vision)
    yield types.SimpleNamespace(family=request.param, engine=engine, chat=chat, rows=rows, vision=vision, batch=batch)
    engine.close()


# -- the batch itself ----------------------------------------------------------------------------


def test_rows_are_processor_expanded(case):
    batch, rows, pad = case.batch, case.rows, case.vision.image_pad_id
    t = batch.batch
    assert t["position_ids"].shape == (len(rows), 4, t["input_ids"].shape[1])
    mmi = batch.non_tensor_batch["multi_modal_inputs"]
    merge = case.vision.image_processor.merge_size ** 2
    model = case.engine.model
    for i, row in enumerate(rows):
        ro = row.rollout
        counts = [int(g.prod()) // merge for g in mmi[i]["image_grid_thw"]] if ro.images else []
        assert sorted(mmi[i]) == (["image_grid_thw", "images_seqlens", "pixel_values"] if ro.images else [])
        # task image in the prompt, tool images inside the response (observation turns)
        assert int((t["prompts"][i] == pad).sum()) == sum(counts[:1])
        assert int((t["responses"][i] == pad).sum()) == sum(counts[1:])
        # image tokens == vision features the model computes from this row's pixels
        if ro.images:
            with torch.no_grad():
                feats = model.model.get_image_features(mmi[i]["pixel_values"], mmi[i]["image_grid_thw"]).pooler_output
            assert int((t["input_ids"][i] == pad).sum()) == sum(f.shape[0] for f in feats) == sum(counts)
        # the added image tokens are observation tokens: no loss, no log-prob
        on_pad = t["responses"][i] == pad
        assert not t["response_mask"][i][on_pad].any() and not t["rollout_log_probs"][i][on_pad].any()
        # every model token keeps its mask and log-prob, in order
        kept = t["rollout_log_probs"][i][t["response_mask"][i].bool()]
        want = ro.response_logprobs[ro.response_mask.astype(bool)]
        assert torch.equal(kept, torch.from_numpy(want))
        assert int(t["attention_mask"][i].sum()) == len(ro.prompt_ids) + len(ro.response_ids) + sum(counts) - len(counts)


def test_rows_whose_pads_and_images_disagree_are_refused(case):
    from axpo_rllm.core.records import TrainingRow

    row = case.rows[0]
    ro = row.rollout
    pad = case.vision.image_pad_id

    def build(rollout):
        return build_verl_batch([TrainingRow(rollout, row.role, row.adv_group, row.score, row.segments)],
                                pad_token_id=0, vision=case.vision)

    shifted = (-1, ro.image_offsets[1] - 1, ro.image_offsets[2])
    with pytest.raises(ValueError, match="do not match its image pads"):
        build(dataclasses.replace(ro, image_offsets=shifted))
    with pytest.raises(ValueError, match="do not match its image pads"):
        build(dataclasses.replace(ro, images=ro.images[:2], image_offsets=ro.image_offsets[:2]))
    mask = ro.response_mask.copy()
    mask[ro.image_offsets[1]] = 1
    with pytest.raises(ValueError, match="a model token is an image pad"):
        build(dataclasses.replace(ro, response_mask=mask))
    assert ro.response_ids[ro.image_offsets[1]] == pad
    with pytest.warns(UserWarning, match="no vision=VisionProcessing"):
        build_verl_batch(case.rows, pad_token_id=0)


def test_verl_compute_advantage_gives_the_rows_advantages_at_the_expanded_positions(case):
    out = compute_advantage(copied(case.batch), "axpo", config=OmegaConf.create({"axpo": {"epsilon": 1e-6}}))
    adv, mask = token_arrays(case.rows)
    got = out.batch["advantages"]
    for i in range(len(case.rows)):
        loss = case.batch.batch["response_mask"][i].bool()
        assert torch.allclose(got[i][loss], adv[i][mask[i].bool()], atol=1e-6)
        assert not got[i][~loss].any()
    assert adv.abs().sum() > 0


def verl_processor(case):
    """A real Qwen processor with the model's get_rope_index bound as verl's hf_processor binds it
    (``processor.config = config``; ``types.MethodType(ModelClass.get_rope_index, processor)``).

    Built by hand: ``AutoProcessor`` needs torchvision for the video processor, absent here, and
    the processor class checks its video processor's class; images never touch it.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    base, model_class = {"qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2_5_VLModel), "qwen3_vl": (Qwen3VLProcessor, Qwen3VLModel)}[case.family]
    cls = type(base.__name__, (base,), {"check_argument_for_proper_class": lambda self, name, arg: type(arg)})
    no_video = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)
    processor = cls(image_processor=case.engine.image_processor, tokenizer=AutoTokenizer.from_pretrained(case.engine.model_dir),
                    video_processor=no_video)
    processor.config = case.engine.model.config
    processor.get_rope_index = types.MethodType(model_class.get_rope_index, processor)
    processor.get_vision_position_ids = types.MethodType(model_class.get_vision_position_ids, processor)
    return processor


def test_multi_modal_inputs_and_position_ids_equal_verls_agent_loop(case):
    processor = verl_processor(case)
    worker = types.SimpleNamespace(processor=processor, tokenizer=processor.tokenizer, mm_processor_kwargs=None)
    worker._get_mm_processor_kwargs = lambda audio_data=None: {}
    t = case.batch.batch
    for i, row in enumerate(case.rows):
        ids, am = t["input_ids"][i : i + 1], t["attention_mask"][i : i + 1]
        output = types.SimpleNamespace(multi_modal_data={"images": list(row.rollout.images)} if row.rollout.images else {},
                                       mm_processor_kwargs=None)
        theirs = AgentLoopWorker._compute_multi_modal_inputs(worker, output, ids)
        positions = AgentLoopWorker._compute_position_ids(worker, ids, am, theirs)  # pops mm_token_type_ids, as in verl
        ours = case.batch.non_tensor_batch["multi_modal_inputs"][i]
        assert sorted(theirs) == sorted(ours)
        for key in ours:
            assert torch.equal(theirs[key], ours[key]), key
        assert torch.equal(positions[0], t["position_ids"][i])


# -- verl's actor forward ------------------------------------------------------------------------


class CPUPlatform(PlatformCUDA):
    """verl's CUDA platform with the device calls answered for the CPU."""

    device_name = "cpu"

    def is_available(self) -> bool:
        return True

    def current_device(self):
        return "cpu"


@pytest.fixture(scope="module")
def verl_cpu():
    """verl's platform set to the CPU and a one-rank gloo group (verl all-reduces token counts)."""
    import torch.distributed as dist

    before = platform_manager._current_platform
    platform_manager.set_platform(CPUPlatform())
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()
    platform_manager._current_platform = before


@pytest.fixture
def verl_model(case, verl_cpu, monkeypatch):
    """The model with verl's ``apply_monkey_patch`` installed as ``FSDPEngine._build_module`` does;
    the patched class attributes (transformers' Qwen-VL modules) are restored afterwards."""
    import importlib

    for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        for cls in [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]:
            for attr, value in list(vars(cls).items()):
                if callable(value):
                    monkeypatch.setattr(cls, attr, value)
    apply_monkey_patch(model=case.engine.model, use_remove_padding=False, ulysses_sp_size=1, use_fused_kernels=False)
    return case.engine.model


def verl_engine(model) -> FSDPEngineWithLMHead:
    engine = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)  # __init__ builds meshes and loads a checkpoint
    engine.module = model
    engine.engine_config = FSDPEngineConfig(use_torch_compile=False)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits  # what __init__ sets without torch.compile
    engine._autocast_dtype = torch.float32  # fp32: forward_step runs without autocast
    engine.pad_to_length = False
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.ulysses_device_mesh = None
    return engine


def copied(batch: DataProto) -> DataProto:
    """A copy to edit (``DataProto.select`` shares the tensors even with ``deepcopy=True``)."""
    return DataProto(batch=batch.batch.clone(), non_tensor_batch=dict(batch.non_tensor_batch), meta_info=dict(batch.meta_info))


def verl_old_log_probs(model, batch, micro_batch_size: int) -> torch.Tensor:
    """``RayPPOTrainer._compute_old_log_prob`` -> ``TrainingWorker.infer_batch`` on one rank."""
    batch = copied(batch)
    batch.meta_info["temperature"] = 1.0
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, calculate_sum_pi_squared=False, compute_loss=False)
    # TrainingWorker.infer_batch's defaults, with use_remove_padding off
    tu.assign_non_tensor(td, use_remove_padding=False, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size,
                         use_fused_kernels=False)
    output = verl_engine(model).infer_batch(td, loss_function=None)
    return no_padding_2_padding(output["model_output"]["log_probs"], td).float()


def max_loss_token_gap(case, log_probs) -> float:
    mask = case.batch.batch["response_mask"].bool()
    return float((log_probs - case.batch.batch["rollout_log_probs"]).abs()[mask].max())


def test_verls_actor_reproduces_the_rollout_log_probs(case, verl_model, record_property):
    log_probs = verl_old_log_probs(verl_model, case.batch, micro_batch_size=len(case.rows))
    gap = max_loss_token_gap(case, log_probs)
    record_property(f"max_abs_logprob_gap_{case.family}", gap)
    print(f"{case.family}: max |verl log-prob - rollout log-prob| over loss tokens = {gap:.2e}")
    assert gap < TOL


def test_one_dimensional_positions_do_not_reproduce(case, verl_model):
    """The check can fail: the same batch with 1-D text positions (what the builder wrote before)
    either is refused by verl's patched Qwen-VL forward or gives other log-probs."""
    bad = copied(case.batch)
    am = bad.batch["attention_mask"]
    bad.batch["position_ids"] = torch.clamp(torch.cumsum(am, dim=-1) - 1, min=0)
    try:
        gap = max_loss_token_gap(case, verl_old_log_probs(verl_model, bad, micro_batch_size=len(case.rows)))
    except ValueError as exc:
        assert "position_ids" in str(exc)
        print(f"{case.family}: 1-D positions refused: {exc}")
    else:
        print(f"{case.family}: 1-D positions: max gap {gap:.2e}")
        assert gap > 1e-3


def test_misplaced_image_tokens_do_not_reproduce(case, verl_model):
    """The check can fail: the right number of image tokens, but each tool image's run moved
    before the observation text it belongs in (features still match tokens, so the model does
    not complain) gives other log-probs."""
    bad = copied(case.batch)
    pad = case.vision.image_pad_id
    responses, ids = bad.batch["responses"], bad.batch["input_ids"]
    width = bad.batch["prompts"].shape[1]
    moved = 0
    for i in range(len(case.rows)):
        row = responses[i]
        where = torch.nonzero(row == pad).flatten()
        if not len(where):
            continue
        start = int(where[0])
        end = start + int((row[start:] == pad).long().cumprod(0).sum())  # the first tool image's run
        # <|vision_start|> run -> run <|vision_start|>: the same tokens, the run one place earlier
        row[start - 1 : end] = torch.roll(row[start - 1 : end].clone(), -1)
        ids[i, width:] = row
        moved += 1
    assert moved == 2
    gap = max_loss_token_gap(case, verl_old_log_probs(verl_model, bad, micro_batch_size=len(case.rows)))
    print(f"{case.family}: misplaced image run: max gap {gap:.2e}")
    assert gap > 1e-3

"""The `axpo` estimator inside the real verl 0.9.1 (CPU): registration, GRPO equality, the built
batch, and verl's own PPO-clip + KL on it."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

pytest.importorskip("verl")

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.core_algos import AdvantageEstimator, agg_loss, compute_policy_loss_vanilla, kl_penalty  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from axpo_rllm.core.advantages import build_training_rows, token_arrays
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import plan_resampling  # noqa: E402
from synthetic_rollouts import make_continuation, make_rollout, random_step  # noqa: E402
from axpo_rllm.integrations.verl.batch import build_verl_batch  # noqa: E402
from axpo_rllm.core.records import QuestionGroup  # noqa: E402
from verl import DataProto  # noqa: E402


def test_registered_through_the_entry_point_in_a_fresh_interpreter():
    code = textwrap.dedent(
        """
        import sys
        import verl
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn
        fn = get_adv_estimator_fn("axpo")
        assert "axpo_rllm.integrations.verl.estimator" in sys.modules, "loaded by verl, not by us"
        print(fn.__module__, fn.__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "axpo_rllm.integrations.verl.estimator compute_axpo_advantage"


def test_plugins_off_means_no_estimator():
    code = "import verl\nfrom verl.trainer.ppo.core_algos import get_adv_estimator_fn\nget_adv_estimator_fn('axpo')"
    env = {"VERL_USE_EXTERNAL_PLUGINS": "none", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0 and "Unknown advantage estimator" in out.stderr


def random_batch(bs, length, n_groups, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(bs, length, generator=g) > 0.2).long()
    mask[:, 0] = 1
    rewards = torch.zeros(bs, length)
    rewards[torch.arange(bs), torch.randint(0, length, (bs,), generator=g)] = torch.randint(0, 2, (bs,), generator=g).float()
    uid = np.array([f"u{int(i)}" for i in torch.randint(0, n_groups, (bs,), generator=g)], dtype=object)
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": uid}
    )


@settings(max_examples=60, deadline=None)
@given(
    bs=st.integers(1, 48),
    length=st.integers(1, 24),
    n_groups=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    norm=st.booleans(),
)
def test_axpo_equals_verl_grpo_when_nothing_is_triggered(bs, length, n_groups, seed, norm):
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": norm, "axpo": {"k": 4}})
    ours = compute_advantage(random_batch(bs, length, n_groups, seed), "axpo", config=config)
    grpo = compute_advantage(random_batch(bs, length, n_groups, seed), AdvantageEstimator.GRPO, norm_adv_by_std_in_grpo=norm)
    assert torch.allclose(ours.batch["advantages"], grpo.batch["advantages"], atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.batch["returns"], grpo.batch["returns"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [False, True])
def test_the_shipped_config_normalises_as_verl_grpo_with_the_same_flag(norm):
    """verl's ``algorithm.norm_adv_by_std_in_grpo`` alone decides (Dr. GRPO when false): the
    ``axpo`` estimator given the shipped ``algorithm`` section (its ``axpo`` node included) equals
    verl's own ``compute_grpo_outcome_advantage`` with the same flag on an untriggered batch."""
    from axpo_rllm.configs.loader import axpo_config, load_config

    cfg = load_config(None, [f"algorithm.norm_adv_by_std_in_grpo={str(norm).lower()}"])
    batch = random_batch(48, 12, 6, seed=11)
    ours = compute_advantage(batch, "axpo", config=cfg.algorithm)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(
        random_batch(48, 12, 6, seed=11).batch["token_level_rewards"], batch.batch["response_mask"],
        batch.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=norm)
    assert grpo.abs().max() > 0
    assert torch.allclose(ours.batch["advantages"], grpo, atol=1e-5, rtol=1e-5)
    assert axpo_config(cfg).norm_by_std is norm, "the core's rows (CPU trainer, rllm hook) read the same flag"


def test_one_std_switch_the_alias_must_agree_with_verls_key():
    from axpo_rllm.configs.loader import load_config
    from axpo_rllm.core.config import std_normalization

    assert std_normalization({"axpo": {"norm_by_std": False}}) is False, "the alias alone is read"
    assert std_normalization({"norm_adv_by_std_in_grpo": False, "axpo": {}}) is False
    assert std_normalization({}) is True, "verl's default"
    with pytest.raises(ValueError, match=r"algorithm\.norm_adv_by_std_in_grpo=False and algorithm\.axpo\.norm_by_std=True"):
        std_normalization({"norm_adv_by_std_in_grpo": False, "axpo": {"norm_by_std": True}})
    with pytest.raises(ValueError, match="algorithm.norm_adv_by_std_in_grpo=True and algorithm.axpo.norm_by_std=False"):
        load_config(None, ["algorithm.axpo.norm_by_std=false"])


def test_axpo_equals_grpo_on_a_built_batch_with_nothing_triggered():
    groups = random_step(6, 8, max_response=64, all_wrong_rate=0.0, accuracy=0.6, seed=3)
    for g in groups:  # make sure no tool subgroup is all wrong
        assert not plan_resampling([g] * 1, AXPOConfig(r=1.0, k=1)).jobs
    cfg = AXPOConfig(r=0.25, k=4)
    rows = build_training_rows(groups, plan_resampling(groups, cfg), [], cfg)
    batch = build_verl_batch(rows, pad_token_id=0)
    ours = compute_advantage(batch, "axpo", config=OmegaConf.create({"axpo": {}}))
    grpo = compute_advantage(build_verl_batch(rows, pad_token_id=0), AdvantageEstimator.GRPO)
    assert torch.allclose(ours.batch["advantages"], grpo.batch["advantages"], atol=1e-6)


def axpo_step(separate=True, credit=True, seed=0):
    """A triggered step with known recoveries: the most uncertain prefixes recover on continuation 0."""
    groups = random_step(8, 8, max_response=96, tool_rate=0.5, all_wrong_rate=0.8, seed=seed)
    cfg = AXPOConfig(r=0.25, k=4, separate_groups=separate, prefix_credit=credit)
    plan = plan_resampling(groups, cfg)
    assert plan.jobs, "the random step must trigger"
    by_id = {r.rollout_id: r for g in groups for r in g.rollouts}
    conts = [
        make_continuation(by_id[j.source_id], j.prefix_len, i, correct=(i == 0 and n % 2 == 0))
        for n, j in enumerate(plan.jobs)
        for i in range(j.k)
    ]
    return groups, plan, conts, build_training_rows(groups, plan, conts, cfg)


@pytest.mark.parametrize("separate, credit", [(True, True), (False, True), (True, False), (False, False)])
def test_verl_compute_advantage_reproduces_the_framework_neutral_advantages(separate, credit):
    _, plan, _, rows = axpo_step(separate, credit)
    want, loss_mask = token_arrays(rows)
    batch = build_verl_batch(rows, pad_token_id=0)
    assert torch.equal(batch.batch["response_mask"], loss_mask.long())
    out = compute_advantage(batch, "axpo", config=OmegaConf.create({"axpo": {"epsilon": 1e-6}}))
    assert torch.allclose(out.batch["advantages"], want, atol=1e-6)
    assert len(batch) == 64 + plan.used


def test_masked_tokens_never_reach_the_loss():
    groups, plan, conts, rows = axpo_step()
    batch = build_verl_batch(rows, pad_token_id=0)
    roles = batch.non_tensor_batch["axpo_role"]
    mask = batch.batch["response_mask"]
    for i, row in enumerate(rows):
        n = len(row.rollout.response_ids)
        if roles[i] == "continuation":
            assert mask[i, : row.rollout.prefix_len].sum() == 0, "a continuation's prefix is context"
            assert mask[i, row.rollout.prefix_len : n].sum() > 0
        elif roles[i] == "source_prefix":
            cut = row.rollout.first_tool_call.body_start
            assert mask[i, cut:].sum() == 0, "the source's own continuation is masked"
            assert mask[i, :cut].sum() == row.rollout.response_mask[:cut].sum()
        assert mask[i, n:].sum() == 0
    # uid: continuation groups are separate from the question's group
    uids = set(batch.non_tensor_batch["uid"][roles == "continuation"])
    assert uids and not uids & set(batch.non_tensor_batch["question_id"])


def test_scores_live_on_the_last_loss_token():
    _, _, _, rows = axpo_step()
    batch = build_verl_batch(rows, pad_token_id=0)
    sums = batch.batch["token_level_rewards"].sum(-1)
    assert torch.equal(sums, torch.tensor([r.score for r in rows], dtype=torch.float32))
    last = (batch.batch["response_mask"] * torch.arange(batch.batch["response_mask"].shape[1])).argmax(-1)
    nz = batch.batch["token_level_rewards"].ne(0).any(-1)
    assert torch.equal(batch.batch["token_level_rewards"].argmax(-1)[nz], last[nz])


def test_policy_loss_and_kl_run_on_the_built_batch_with_asymmetric_clip():
    _, _, _, rows = axpo_step()
    batch = compute_advantage(build_verl_batch(rows, pad_token_id=0), "axpo", config=OmegaConf.create({"axpo": {}}))
    adv, mask = batch.batch["advantages"], batch.batch["response_mask"].float()
    old = batch.batch["rollout_log_probs"]
    g = torch.Generator().manual_seed(0)
    new = (old + 0.5 * torch.randn(old.shape, generator=g)).requires_grad_(True)
    ref = old + 0.1 * torch.randn(old.shape, generator=g)
    actor = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2, clip_ratio_high=0.4, rollout_n=8)
    loss, metrics = compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", config=actor)
    kl = agg_loss(kl_penalty(new, ref, "low_var_kl"), mask, "token-mean", **actor.global_batch_info)
    (loss + 1e-3 * kl).backward()
    assert torch.isfinite(loss) and torch.isfinite(kl) and kl >= 0
    # masked tokens (context prefixes, the source's tail, observations, padding) get no gradient at all
    assert new.grad[mask == 0].abs().sum() == 0
    assert new.grad[mask == 1].abs().sum() > 0
    # the asymmetric clip: with A > 0 the ratio is clipped at 1.4, with A < 0 at 0.8
    ratio = torch.exp(new.detach() - old)
    pos_clipped = ((adv > 0) & (ratio > 1.4) & (mask == 1)).float().sum()
    neg_clipped = ((adv < 0) & (ratio < 0.8) & (mask == 1)).float().sum()
    expected = (pos_clipped + neg_clipped) / mask.sum()
    assert metrics["actor/pg_clipfrac"] == pytest.approx(expected.item(), abs=1e-6)


def test_keep_tail_cannot_travel_through_verl():
    groups = random_step(4, 8, max_response=64, tool_rate=0.5, all_wrong_rate=1.0, seed=1)
    cfg = AXPOConfig(r=0.25, k=4, source_tail="keep")
    plan = plan_resampling(groups, cfg)
    by_id = {r.rollout_id: r for g in groups for r in g.rollouts}
    conts = [make_continuation(by_id[j.source_id], j.prefix_len, i, correct=i == 0) for j in plan.jobs for i in range(j.k)]
    rows = build_training_rows(groups, plan, conts, cfg)
    with pytest.raises(ValueError, match="source_tail=keep"):
        build_verl_batch(rows, pad_token_id=0)


def test_missing_uid_is_a_clear_error():
    fn = core_algos.get_adv_estimator_fn("axpo")
    with pytest.raises(ValueError, match="uid"):
        fn(token_level_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3), config=None)


def test_images_travel_as_multi_modal_data():
    q = QuestionGroup("q", tuple(make_rollout(f"r{i}", "q", correct=i == 0) for i in range(2)))
    rows = build_training_rows([q], plan_resampling([q], AXPOConfig(enable=False)), [], AXPOConfig(enable=False))
    object.__setattr__(rows[0].rollout, "images", ("IMG",))
    object.__setattr__(rows[0].rollout, "image_offsets", (-1,))
    batch = build_verl_batch(rows, pad_token_id=0)
    assert batch.non_tensor_batch["multi_modal_data"][0] == {"image": ["IMG"]}
    assert batch.non_tensor_batch["multi_modal_data"][1] == {"image": []}

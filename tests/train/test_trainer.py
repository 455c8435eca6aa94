"""The CPU AXPO update: one real step (tiny Qwen-VL, real engine and tools), verl's registered
estimator and losses, gradients only through the loss mask, weights shared with the engine."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from axpo_rllm.configs.loader import axpo_config, load_config
from axpo_rllm.envs.verifiers import VerifyResult
from axpo_rllm.core.records import TrainingRow
from axpo_rllm.train.trainer import AXPOTrainer, RLConfig, sync_weights

CALL_TEXT = '<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>'


class CoinGrader:
    """Mixed rewards for a random model: correct iff the response's crc32 is even (deterministic)."""

    def grade_task(self, task, response):
        ok = zlib.crc32(response.encode()) % 2 == 0
        return VerifyResult(reward=float(ok), correct=ok, extracted=None)


@pytest.fixture(scope="module")
def setup(model_dir, tools, world, tmp_path_factory):
    from axpo_rllm.train.actor import Policy
    from axpo_rllm.agents.agent import AgentConfig, ChatFormat
    from tool_biased_engine import ToolBiasedEngine
    from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
    from axpo_rllm.engines.transformers_engine import TransformersEngine
    from axpo_rllm.envs.env import MultimodalToolEnv

    torch.manual_seed(0)
    engine = TransformersEngine(model_dir)
    chat = ChatFormat(engine.tokenizer)
    policy = Policy(engine.model, engine.image_processor, engine.tokenizer.pad_token_id)
    cfg = load_config(None, ["algorithm.axpo.r=0.5", "algorithm.axpo.k=2"])
    biased = ToolBiasedEngine(engine, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=chat.encode(CALL_TEXT),
                              open_rate=0.3, call_rate=0.4, body_rate=0.5)
    agent = AgentConfig(max_tokens_per_turn=12, max_response_tokens=160, max_turns=2)
    workflow = AXPOWorkflow(biased, chat, lambda: MultimodalToolEnv(tools=tools, grader=CoinGrader()),
                            WorkflowConfig(n=4, axpo=axpo_config(cfg), agent=agent, seed=1))
    log = tmp_path_factory.mktemp("rl") / "metrics.jsonl"
    trainer = AXPOTrainer(policy, workflow, cfg, RLConfig(lr=5e-3, micro_batch_size=6, log_path=str(log)))
    yield trainer, world_tasks(), log
    engine.close()


@pytest.fixture(scope="module")
def stepped(setup, monkeypatch_module):
    """One full training step, with verl's estimator registry spied on."""
    from verl.trainer.ppo import core_algos

    trainer, tasks, log = setup
    asked: list[str] = []
    real = core_algos.get_adv_estimator_fn

    def spy(name):
        asked.append(str(name))
        return real(name)

    monkeypatch_module.setattr(core_algos, "get_adv_estimator_fn", spy)
    before = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}
    metrics = trainer.step(tasks, 0)
    monkeypatch_module.undo()
    return trainer, metrics, asked, before, log


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_a_step_runs_the_registered_axpo_estimator(stepped):
    _, metrics, asked, _, _ = stepped
    assert asked == ["axpo"]  # verl's compute_advantage dispatched to our registered estimator
    assert metrics["axpo/enabled"] == 1.0 and "axpo/triggered_questions" in metrics


def test_actor_logprobs_match_the_engines_rollout_logprobs(stepped):
    """The actor recomputes exactly what the engine sampled (images, M-RoPE, observation turns)."""
    _, metrics, _, _, _ = stepped
    assert metrics["actor/loss_tokens"] > 0
    assert metrics["actor/rollout_logprob_abs_diff"] < 1e-4


def test_the_step_changes_the_weights_and_logs_a_jsonl_line(stepped):
    trainer, metrics, _, before, log = stepped
    assert metrics["actor/adv_abs_mean"] > 0  # mixed rewards: some advantage is non-zero
    changed = [n for n, p in trainer.policy.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    assert trainer.sync_mode == "shared" and trainer.workflow.engine.inner.model is trainer.policy.model
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["step"] == 0 and "actor/pg_loss" in line and "axpo/tool_use_rate" in line and "timing/step_s" in line


def _grads(trainer, batch):
    trainer.backward(batch)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in trainer.policy.model.named_parameters()}


def test_fully_masked_rows_add_no_gradient(stepped):
    """Weights move only through unmasked tokens: adding rows whose loss mask is all zero (with
    their own rewards, advantages and tokens, run through the same forward) leaves every gradient
    unchanged, and a batch of only masked rows has none."""
    trainer, _, _, _, _ = stepped
    result = trainer.workflow.run_step(world_tasks(), 1)
    rows = [r for r in result.rows if r.segments]
    assert rows
    masked = [TrainingRow(r.rollout, r.role, f"masked-{i}", 1.0 - r.score, ()) for i, r in enumerate(result.rows)]
    old_rl = trainer.rl
    try:
        trainer.rl = RLConfig(micro_batch_size=64, skip_masked_rows=False)
        base = _grads(trainer, trainer.make_batch(rows))
        mixed = _grads(trainer, trainer.make_batch(rows + masked))
        for name in base:
            torch.testing.assert_close(mixed[name], base[name], rtol=1e-4, atol=1e-7)  # float32 sums over other micro-batch layouts: ~2e-5 relative; a leak is O(1)
        assert any(g.abs().sum() > 0 for g in base.values())
        only = trainer.make_batch(masked)
        assert int(only.batch["response_mask"].sum()) == 0
        assert all(g.abs().sum() == 0 for g in _grads(trainer, only).values())
    finally:
        trainer.rl = old_rl


def world_tasks():
    from axpo_rllm.demo.world import SyntheticWorld

    return SyntheticWorld(seed=3, n_facts=40).tasks(2, "train", families=["crop", "color"])


def test_sync_weights_modes(model_dir, setup):
    from axpo_rllm.engines.transformers_engine import TransformersEngine

    trainer = setup[0]
    other = TransformersEngine(model_dir)
    try:
        assert sync_weights(other, trainer.policy.model) == "load_state_dict"
        for (n, a), (_, b) in zip(other.model.named_parameters(), trainer.policy.model.named_parameters()):
            assert torch.equal(a, b), n
    finally:
        other.close()
    with pytest.raises(NotImplementedError, match="cannot push weights"):
        sync_weights(object(), trainer.policy.model)


def test_an_update_moves_log_probs_the_way_the_advantages_point(stepped):
    """After one update on a batch, tokens with positive advantage became likelier and tokens with
    negative advantage less likely (the sign convention of verl's PPO loss, end to end)."""
    trainer, _, _, _, _ = stepped
    result = trainer.workflow.run_step(world_tasks(), 2)
    batch = trainer.make_batch(result.rows)
    adv, mask = batch.batch["advantages"], batch.batch["response_mask"].bool()
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    if not pos.any() or not neg.any():
        pytest.skip("this draw gave one-sided advantages")
    idx = list(range(len(result.rows)))

    def logp():
        with torch.no_grad():
            return trainer.forward(trainer.policy, batch, idx)

    before = logp()
    old_rl = trainer.rl
    try:
        trainer.rl = RLConfig(lr=old_rl.lr, micro_batch_size=64)
        trainer.update(batch)
    finally:
        trainer.rl = old_rl
    after = logp()
    assert (after - before)[pos].mean() > 0 > (after - before)[neg].mean()


def test_mini_batches_move_the_policy_between_optimiser_steps_so_the_clip_binds(stepped, monkeypatch):
    """verl's ``ppo_mini_batch_size``: with the whole batch in one optimiser step the ratio is 1 and
    the 0.2/0.4 clip never binds; with one question per mini-batch (old log-probs computed once,
    before the first) the second mini-batch sees the policy the first one moved. Its clip fraction
    is computed here by hand (tokens with A > 0 and ratio > 1.4, or A < 0 and ratio < 0.8) after a
    hand-made first step, and must be > 0 and equal what the trainer reports."""
    trainer = stepped[0]
    batch = trainer.make_batch(trainer.workflow.run_step(world_tasks(), 3).rows)
    questions = batch.non_tensor_batch["question_id"]
    start = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}
    old_rl, old_opt = trainer.rl, trainer.optimizer

    def fresh(rl):  # the same weights and a fresh optimiser with a step large enough to leave the clip range
        trainer.policy.model.load_state_dict(start, strict=False)
        trainer.rl, trainer.optimizer = rl, torch.optim.AdamW(trainer.params, lr=0.05, weight_decay=0.0)

    try:
        fresh(RLConfig(micro_batch_size=64))
        whole = trainer.update(batch)
        assert whole["actor/optimizer_steps"] == 1 and whole["actor/pg_clipfrac"] == 0.0

        fresh(RLConfig(micro_batch_size=64, ppo_mini_batch_size=1))
        minis = trainer.mini_batches(batch)
        assert [sorted(set(questions[m])) for m in minis] == [[q] for q in dict.fromkeys(questions)]
        assert sorted(i for m in minis for i in m) == list(range(len(batch))), "every row, continuations with their question"
        old = trainer.old_log_probs(batch)
        trainer.backward(batch, old, minis[0])
        torch.nn.utils.clip_grad_norm_(trainer.params, trainer.rl.grad_clip)
        trainer.optimizer.step()
        with torch.no_grad():
            ratio = torch.exp(trainer.forward(trainer.policy, batch, minis[1]) - old[minis[1]])
        adv, mask = batch.batch["advantages"][minis[1]], batch.batch["response_mask"][minis[1]].bool()
        binds = ((adv > 0) & (ratio > 1.4)) | ((adv < 0) & (ratio < 0.8))
        by_hand = float(binds[mask].float().mean())
        assert by_hand > 0, "the first mini-batch's step must move the second one's ratio out of [0.8, 1.4]"

        fresh(RLConfig(micro_batch_size=64, ppo_mini_batch_size=1))
        calls = []
        real = trainer.old_log_probs
        monkeypatch.setattr(trainer, "old_log_probs", lambda b: calls.append(1) or real(b))
        split = trainer.update(batch)
        assert calls == [1], "old log-probs once per step, before the first mini-batch"
        assert split["actor/optimizer_steps"] == 2
        assert split["actor/pg_clipfrac"] == pytest.approx(by_hand / 2, abs=1e-6), "mean over steps: 0 then by_hand"
    finally:
        trainer.policy.model.load_state_dict(start, strict=False)
        trainer.rl, trainer.optimizer = old_rl, old_opt


def test_the_cpu_job_takes_mini_batches_by_default():
    from axpo_rllm.demo.main_job import job_config
    from axpo_rllm.train.trainer import rl_config_from

    for smoke in (False, True):
        cfg = job_config(smoke=smoke)
        rl = rl_config_from(cfg.rl)
        assert 0 < rl.ppo_mini_batch_size < rl.batch_questions, "more than one optimiser step per batch"


def test_a_checkpoint_restores_weights_optimizer_history_and_the_next_step(stepped, tmp_path):
    trainer = stepped[0]
    path = trainer.save_checkpoint(tmp_path / "ckpt.pt", step=4)
    saved = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}
    history = list(trainer.history)
    with torch.no_grad():
        for p in trainer.policy.model.parameters():
            p.add_(1.0)
    trainer.history.append({"step": 99.0})
    assert trainer.load_checkpoint(path) == 5
    for n, p in trainer.policy.model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert [m["step"] for m in trainer.history] == [m["step"] for m in history] and trainer.optimizer.state_dict()["state"]


def test_trimming_rows_after_their_last_loss_token_and_token_budget_micro_batches_change_no_gradient(stepped):
    """Three-turn rollouts with two crop images each, as training rows whose loss window ends at
    the first call (a credited AXPO source's prefix) or covers everything: forwarding each row only
    to its last loss token (the crop images after it dropped), in micro-batches cut by padded
    tokens, gives the gradients of whole rows in one fixed micro-batch."""
    from multimodal_rollouts import rollouts

    from axpo_rllm.core.records import LossSegment, RowRole

    trainer = stepped[0]
    made = rollouts(trainer.workflow.engine.inner, trainer.workflow.chat)
    assert sum(1 for r in made for o in r.image_offsets if o >= 0) >= 4, "expected crop images in the responses"
    rows = []
    for i, r in enumerate(made):
        n = len(r.response_ids)
        rows.append(TrainingRow(r, RowRole.ORDINARY, f"all-{i}", 0.0, (LossSegment(0, n, 0.7 - 0.4 * i),)))
        if r.tool_calls:
            cut = r.tool_calls[0].end
            rows.append(TrainingRow(r, RowRole.ORDINARY, f"prefix-{i}", 1.0, (LossSegment(0, cut, 1.2),)))
    old_rl = trainer.rl
    try:
        trainer.rl = RLConfig(micro_batch_size=64, micro_batch_tokens=0, trim_to_loss=False)
        base_batch = trainer.make_batch(rows)
        base = _grads(trainer, base_batch)
        trainer.rl = RLConfig(micro_batch_size=64, micro_batch_tokens=1200, trim_to_loss=True)
        trimmed_batch = trainer.make_batch(rows)
        assert len(trainer.micro_batches(trimmed_batch)) > 1
        attention, mm = trainer._inputs(trimmed_batch)
        assert attention.sum() < trimmed_batch.batch["attention_mask"].sum(), "nothing was trimmed"
        images = lambda inputs: sum(len(m["image_grid_thw"]) for m in inputs if m)  # noqa: E731
        assert images(mm) < images(base_batch.non_tensor_batch["multi_modal_inputs"]), "no tail image was dropped"
        trimmed = _grads(trainer, trimmed_batch)
        for name in base:
            torch.testing.assert_close(trimmed[name], base[name], rtol=1e-4, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in base.values())
    finally:
        trainer.rl = old_rl


def test_padded_token_batches_hold_every_row_once_within_both_limits():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from axpo_rllm.train.trainer import padded_token_batches

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(1, 1000), st.integers(1, 8))
    def check(lengths, budget, max_rows):
        rows = list(range(100, 100 + len(lengths)))
        batches = padded_token_batches(rows, lengths, budget, max_rows)
        assert sorted(r for b in batches for r in b) == rows
        for b in batches:
            width = max(lengths[r - 100] for r in b)
            assert len(b) <= max_rows and (len(b) == 1 or len(b) * width <= budget)

    check()

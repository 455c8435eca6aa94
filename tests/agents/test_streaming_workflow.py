"""Streaming phase 3 in the workflow (AXPOConfig.streaming): continuations start while phase 1's
slowest question is still running, and the step is the batch barrier's step, token for token."""

from __future__ import annotations

import pytest
from agent_helpers import DelayedEngine, FakeEngine, biased, make_tasks

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.config import AXPOConfig

AGENT = AgentConfig(max_tokens_per_turn=40, max_response_tokens=400)
SLOW = "q3#"  # every request of question q3 (its rollouts and its continuations) is slow


def run(chat, words, env_factory, streaming, slow_s=0.3):
    engine = DelayedEngine(biased(FakeEngine(chat, words), chat, open_rate=0.5, call_rate=0.3, body_rate=0.5),
                           lambda rid: slow_s if rid.startswith(SLOW) else 0.002)
    config = WorkflowConfig(n=4, axpo=AXPOConfig(r=0.5, k=2, streaming=streaming), agent=AGENT, seed=5)
    return AXPOWorkflow(engine, chat, env_factory, config).run_step(make_tasks(4, with_images=False), 0), engine


def phase_edges(engine):
    originals = [span for rid, span in engine.spans.items() if "~c" not in rid]
    conts = [span for rid, span in engine.spans.items() if "~c" in rid and not rid.startswith(SLOW)]
    return max(end for _, end in originals), min(start for start, _ in conts)


@pytest.mark.parametrize("streaming", ["exact", "greedy"])
def test_continuations_start_before_the_last_phase_one_rollout_ends(chat, chat_words, env_factory, streaming):
    # the slow question's requests take 1 s: the 0.2 s margin below holds on a loaded machine too
    res, engine = run(chat, chat_words, env_factory, streaming, slow_s=1.0)
    assert res.plan.jobs and res.metrics["workflow/jobs_early"] >= 1
    last_original_end, first_continuation_start = phase_edges(engine)
    assert first_continuation_start < last_original_end - 0.2, "phase 3 waited for the slow question"
    assert res.metrics["workflow/first_release_s"] < res.metrics["workflow/phase1_s"]
    assert len(res.continuations) == res.plan.used and res.metrics["workflow/extra_samples_exact"] == 1.0


def test_the_batch_barrier_waits_and_exact_streaming_is_the_same_step(chat, chat_words, env_factory):
    batch, engine = run(chat, chat_words, env_factory, "off", slow_s=0.1)
    last_original_end, first_continuation_start = phase_edges(engine)
    assert first_continuation_start >= last_original_end
    exact, _ = run(chat, chat_words, env_factory, "exact", slow_s=0.1)
    assert [j.job_id for j in exact.plan.jobs] == [j.job_id for j in batch.plan.jobs]
    assert [c.rollout_id for c in exact.continuations] == [c.rollout_id for c in batch.continuations]
    for a, b in zip(exact.rollouts, batch.rollouts):
        assert a.rollout_id == b.rollout_id and (a.response_ids == b.response_ids).all() and a.reward == b.reward
    assert [(r.rollout.rollout_id, r.adv_group, r.segments) for r in exact.rows] == \
        [(r.rollout.rollout_id, r.adv_group, r.segments) for r in batch.rows]


@pytest.mark.parametrize("streaming", ["off", "exact"])
def test_a_rollout_whose_call_was_reported_is_not_retried(chat, chat_words, env_factory, streaming):
    # Rollout #0 of every question fails in its second turn, which only a rollout that called a
    # tool in its first turn reaches. Streaming told the planner about that call, so a retry
    # (another rollout, maybe with another call) could contradict a prefix already started.
    engine = biased(FakeEngine(chat, chat_words, fail_ids=("#0/t1",)), chat, open_rate=0.0, call_rate=0.9)
    config = WorkflowConfig(n=4, axpo=AXPOConfig(r=0.5, k=2, streaming=streaming, max_failed_share=0.5), agent=AGENT,
                            seed=5, rollout_retries=1)
    res = AXPOWorkflow(engine, chat, env_factory, config).run_step(make_tasks(4, with_images=False), 0)
    m = res.metrics
    if streaming == "off":
        assert m["workflow/rollout_retries"] >= 1 and m["workflow/retries_skipped_after_call"] == 0
    else:
        assert m["workflow/rollout_retries"] == 0 and m["workflow/retries_skipped_after_call"] >= 1
        assert m["workflow/failed_rollouts"] == m["workflow/retries_skipped_after_call"]
        assert all("scripted failure" in r.error for r in res.rollouts if r.error)


def staggered(chat, words, env_factory, axpo: AXPOConfig, seed: int = 5):
    """Questions finish one after another (q0 first ... q5 last), every request of q<i> waits 0.03*i s."""
    engine = DelayedEngine(biased(FakeEngine(chat, words), chat, open_rate=0.5, call_rate=0.3, body_rate=0.5),
                           lambda rid: 0.03 * int(rid[1]))
    config = WorkflowConfig(n=4, axpo=axpo, agent=AGENT, seed=seed)
    return AXPOWorkflow(engine, chat, env_factory, config).run_step(make_tasks(6, with_images=False), 0)


@pytest.mark.parametrize("speculation", ["group", "rollout"])
def test_speculation_starts_earlier_and_trains_exactly_the_barriers_step(chat, chat_words, env_factory, speculation):
    # E = 6: three slots for six questions, so certainty comes late
    speculated = 0
    for seed in (5, 6, 7):
        batch = staggered(chat, chat_words, env_factory, AXPOConfig(r=0.25, k=2, streaming="off"), seed)
        spec = staggered(chat, chat_words, env_factory, AXPOConfig(r=0.25, k=2, speculation=speculation), seed)
        assert [j.job_id for j in spec.plan.jobs] == [j.job_id for j in batch.plan.jobs]
        assert [(c.rollout_id, c.response_ids.tolist(), c.reward) for c in spec.continuations] == \
            [(c.rollout_id, c.response_ids.tolist(), c.reward) for c in batch.continuations]
        assert [(r.rollout.rollout_id, r.adv_group, r.segments) for r in spec.rows] == \
            [(r.rollout.rollout_id, r.adv_group, r.segments) for r in batch.rows]
        assert spec.metrics["workflow/extra_samples_exact"] == 1.0 and len(spec.continuations) == spec.plan.used
        speculated += spec.metrics["workflow/speculated_jobs"]
        if spec.metrics["workflow/speculated_jobs"]:
            assert spec.metrics["workflow/first_release_s"] < spec.metrics["workflow/phase1_s"]
    assert speculated >= 1, "no step started a prefix before it was certain"

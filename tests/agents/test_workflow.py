"""The AXPO workflow's batch logic on a fast fake engine: budget, token-exact continuation requests,
every docs/algorithm.md §8 switch, and failures that are retried or recorded (never dropped)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from agent_helpers import FakeEngine, RecordingEngine, biased, make_tasks

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.failures import StepFailedError
from axpo_rllm.core.records import RolloutKind, RowRole, Termination

AGENT = AgentConfig(max_tokens_per_turn=40, max_response_tokens=400)


def workflow(chat, engine, env_factory, **axpo):
    wf_kw = {k: axpo.pop(k) for k in list(axpo) if k in ("n", "rollout_retries", "rollout_timeout_s", "agent")}
    config = WorkflowConfig(
        n=wf_kw.get("n", 4), axpo=AXPOConfig(**{"r": 0.5, "k": 2, **axpo}), agent=wf_kw.get("agent", AGENT),
        rollout_retries=wf_kw.get("rollout_retries", 1), rollout_timeout_s=wf_kw.get("rollout_timeout_s", 60.0), seed=5,
    )
    recorder = RecordingEngine(biased(engine, chat, open_rate=0.4, call_rate=0.3, body_rate=0.5))
    return AXPOWorkflow(recorder, chat, env_factory, config), recorder


def first_request(recorder, rollout_id):
    return next(r for r in recorder.requests if r.request_id.startswith(rollout_id + "/"))


def test_axpo_step_spends_the_budget_exactly_with_token_exact_requests(chat, fake_engine, env_factory):
    wf, rec = workflow(chat, fake_engine, env_factory)
    res = wf.run_step(make_tasks(4))
    plan = res.plan
    assert plan.budget == 8 and plan.jobs and len(res.continuations) == plan.used
    assert res.metrics["workflow/extra_samples_exact"] == 1.0
    jobs = {j.source_id: j for j in plan.jobs}
    for cont in res.continuations:
        job = jobs[cont.source_id]
        req = first_request(rec, cont.rollout_id)
        assert req.prompt_ids == tuple(job.request_ids) and req.images == job.images
        assert (cont.response_ids[: job.prefix_len] == job.prefix_ids).all() and cont.prefix_len == job.prefix_len
        assert job.prefix_ids[-1] == chat.call_open_id  # the prefix ends right after <tool_call>
    assert len(res.rows) == 16 + plan.used
    roles = {row.rollout.rollout_id: row for row in res.rows}
    for job in plan.jobs:
        src = roles[job.source_id]
        assert src.role is RowRole.SOURCE_PREFIX and [(s.start, s.end) for s in src.segments] == [(0, job.prefix_len)]
    assert res.metrics["axpo/triggered_questions"] >= 1 and res.metrics["workflow/generated_tokens_phase3"] > 0


def test_grpo_is_the_same_phase_one_without_resampling(chat, fake_engine, env_factory):
    axpo, _ = workflow(chat, fake_engine, env_factory)
    grpo, rec = workflow(chat, FakeEngine(chat, fake_engine.words), env_factory, enable=False)
    a, g = axpo.run_step(make_tasks(3)), grpo.run_step(make_tasks(3))
    assert not g.plan.jobs and not g.continuations and all(row.role is RowRole.ORDINARY for row in g.rows)
    for ra, rg in zip((r for q in a.groups for r in q.rollouts), (r for q in g.groups for r in q.rollouts)):
        assert ra.rollout_id == rg.rollout_id and (ra.response_ids == rg.response_ids).all()
    assert not any("~c" in r.request_id for r in rec.requests)


@pytest.mark.parametrize(
    "switch",
    [
        {"prefix_fix": False},
        {"resample_target": "no_tool"},
        {"ranking": "random"},
        {"ranking": "confidence"},
        {"prefix_credit": False},
        {"separate_groups": False},
        {"source_tail": "keep"},
        {"agent": AgentConfig(max_tokens_per_turn=40, max_response_tokens=400, cap_policy="mask")},
        {"n": 8, "enable": False},  # 'rollout 2x'
    ],
    ids=lambda s: ",".join(f"{k}={v if k != 'agent' else 'cap=mask'}" for k, v in s.items()),
)
def test_every_ablation_switch_runs_a_step(chat, fake_engine, env_factory, switch):
    wf, rec = workflow(chat, fake_engine, env_factory, **dict(switch))
    res = wf.run_step(make_tasks(4))
    assert len(res.continuations) == res.plan.used <= res.plan.budget
    cfg = wf.config.axpo
    if not cfg.enable:
        assert len(res.rows) == 4 * wf.config.n and not res.continuations
        return
    assert res.plan.jobs, "the forced trigger should select prefixes"
    for cont in res.continuations:
        job = next(j for j in res.plan.jobs if j.source_id == cont.source_id)
        assert first_request(rec, cont.rollout_id).prompt_ids == tuple(job.request_ids)
    conts = [row for row in res.rows if row.role is RowRole.CONTINUATION]
    if switch.get("prefix_fix") is False:
        assert all(c.prefix_len == 0 for c in res.continuations)
    if switch.get("resample_target") == "no_tool":
        for job in res.plan.jobs:
            assert job.prefix_len > 0 and chat.think_close_id == job.prefix_ids[-1]
    if switch.get("prefix_credit") is False:
        assert not any(row.role is RowRole.SOURCE_PREFIX for row in res.rows)
    if switch.get("separate_groups") is False:
        assert all(row.adv_group == row.rollout.question_id for row in conts)
    elif conts:
        assert all("::" in row.adv_group for row in conts)
    if switch.get("source_tail") == "keep":
        assert any(len(row.segments) == 2 for row in res.rows if row.role is RowRole.SOURCE_PREFIX)
    if "agent" in switch:
        over = [r for r in res.rollouts if r.termination is Termination.OVER_TURN]
        assert all(not row.segments for row in res.rows if row.rollout.termination is Termination.OVER_TURN and row.role is RowRole.ORDINARY)
        assert res.metrics["axpo/over_turn_rollouts"] == len(over)


def test_failed_rollouts_are_retried_then_recorded_and_the_budget_stays_exact(chat, chat_words, env_factory):
    engine = FakeEngine(chat, chat_words, fail_ids=("q0#1/", "~c1/"))
    wf, _ = workflow(chat, engine, env_factory, rollout_retries=1, max_failed_share=0.5)
    res = wf.run_step(make_tasks(4))
    failed = [r for r in res.rollouts if r.termination is Termination.ERROR]
    assert {r.rollout_id for r in failed} >= {"q0#1"}
    assert all("scripted failure" in r.error for r in failed)
    assert len(res.groups[0].rollouts) == 4  # the failed rollout kept its place in the group
    assert len(res.continuations) == res.plan.used and res.plan.jobs
    assert all(c.termination is Termination.ERROR for c in res.continuations if c.rollout_id.endswith("~c1"))
    m = res.metrics
    assert m["workflow/failed_rollouts"] == len(failed) and m["axpo/failed_rollouts"] == len(failed)
    assert m["workflow/rollout_retries"] == len(failed)  # one retry each before recording
    assert m["workflow/failure/EngineError"] == 2 * len(failed)
    # every attempt spent its engine retries (2 by default): the failed first attempts' count too
    retries = wf.agent.config.engine_retries
    assert m["workflow/engine_retries"] == 2 * retries * len(failed)
    assert "q0#1" not in {j.source_id for j in res.plan.jobs}  # a failed episode is never a source


def test_an_outage_over_the_bound_stops_the_step_with_its_reasons(chat, chat_words, env_factory):
    engine = FakeEngine(chat, chat_words, fail_ids=("q0#", "q1#0/"))  # 5 of 16 rollouts, every attempt
    wf, _ = workflow(chat, engine, env_factory, rollout_retries=1, enable=False)
    with pytest.raises(StepFailedError, match=r"5 of 16 rollouts failed \(31\.2% > max_failed_share 5\.0%\): EngineError x5 \(e\.g\. q0#0: .*scripted failure"):
        wf.run_step(make_tasks(4))


def test_under_the_bound_failed_rollouts_leave_the_group_statistics(chat, chat_words, env_factory):
    engine = FakeEngine(chat, chat_words, fail_ids=("q0#1/",))  # 1 of 16 = 6.25%
    wf, _ = workflow(chat, engine, env_factory, rollout_retries=0, enable=False, max_failed_share=0.1)
    res = wf.run_step(make_tasks(4))
    rows = {r.rollout.rollout_id: r for r in res.rows}
    assert rows["q0#1"].segments == () and rows["q0#1"].adv_group == "q0::failed::q0#1"
    assert res.metrics["axpo/failed_rollouts"] == 1 and res.metrics["axpo/failed/EngineError"] == 1
    assert res.metrics["axpo/failed_share"] == pytest.approx(1 / 16)
    live = [rows[f"q0#{i}"] for i in (0, 2, 3)]
    rewards = np.array([r.score for r in live])
    want = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)  # GRPO over the three that answered
    assert [r.segments[0].advantage for r in live] == pytest.approx(list(want), abs=1e-5)
    assert all(r.rollout.termination is not Termination.ERROR for r in live)


def test_a_backend_without_logprobs_stops_the_step_instead_of_failing_rollouts(chat, chat_words, env_factory):
    from axpo_rllm.engines.base import BackendContractError, checked_result

    class NoLogprobs(FakeEngine):
        async def generate(self, request):
            result = await super().generate(request)
            return checked_result(request, result.token_ids, None, result.finish_reason, "a server that dropped them")

    wf, _ = workflow(chat, NoLogprobs(chat, chat_words), env_factory, enable=False, max_failed_share=1.0)
    with pytest.raises(BackendContractError, match="a server that dropped them returned .* token ids but none log-probs"):
        wf.run_step(make_tasks(2))


def test_a_hung_episode_times_out_and_is_recorded(chat, chat_words, env_factory):
    class Slow(FakeEngine):
        async def generate(self, request):
            if request.request_id.startswith("q1#2/"):
                await asyncio.sleep(30)
            return await super().generate(request)

    wf, _ = workflow(chat, Slow(chat, chat_words), env_factory, rollout_retries=0, rollout_timeout_s=0.5, enable=False,
                     max_failed_share=0.25)
    res = wf.run_step(make_tasks(2))
    (hung,) = [r for r in res.rollouts if r.termination is Termination.ERROR]
    assert hung.rollout_id == "q1#2" and hung.error.startswith("Timeout")
    assert res.metrics["workflow/failure/Timeout"] == 1


def test_an_env_that_cannot_start_is_a_recorded_failure(chat, fake_engine):
    def broken():
        raise OSError("no sandbox")

    wf, _ = workflow(chat, fake_engine, broken, rollout_retries=0, enable=False, max_failed_share=1.0)
    res = wf.run_step(make_tasks(1))
    assert all(r.termination is Termination.ERROR and "no sandbox" in r.error for r in res.rollouts)
    assert len(res.rows) == 4
    wf, _ = workflow(chat, fake_engine, broken, rollout_retries=0, enable=False)  # the default bound
    with pytest.raises(StepFailedError, match=r"4 of 4 rollouts failed .*EnvError x4 .*no sandbox"):
        wf.run_step(make_tasks(1))


def test_repeated_task_ids_are_refused(chat, fake_engine, env_factory):
    wf, _ = workflow(chat, fake_engine, env_factory)
    with pytest.raises(ValueError, match="repeat"):
        wf.run_step(make_tasks(2) * 2)


def test_the_step_rows_become_a_verl_batch(chat, fake_engine, env_factory):
    pytest.importorskip("verl")
    from axpo_rllm.integrations.verl.batch import build_verl_batch  # the workflow itself never imports verl

    wf, _ = workflow(chat, fake_engine, env_factory)
    res = wf.run_step(make_tasks(2))
    with pytest.warns(UserWarning, match="image"):  # no processor given: the ids stay unexpanded, loudly
        batch = build_verl_batch(res.rows, pad_token_id=chat.tokenizer.pad_token_id)
    assert batch.batch["responses"].shape[0] == len(res.rows)
    assert np.array_equal(np.unique(batch.non_tensor_batch["uid"]), np.unique([r.adv_group for r in res.rows]))

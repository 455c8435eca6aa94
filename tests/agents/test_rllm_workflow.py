"""The rllm adapter: the AXPO workflow run by rllm's own UnifiedWorkflowEngine, groups handed over
through rllm's grouping hook, advantages from the ``axpo`` estimator through the per-role map.

Skipped without rllm (not on the registry: install it from source to run these)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("rllm")

from agent_helpers import DelayedEngine, FakeEngine, biased, make_tasks  # noqa: E402

from axpo_rllm.agents.agent import AgentConfig  # noqa: E402
from axpo_rllm.integrations.rllm.workflow import (  # noqa: E402
    AXPO_ROLE,
    AXPORllmWorkflow,
    AXPOStepCoordinator,
    AxpoRllmEngine,
    RllmTokenEngine,
    axpo_advantages,
    axpo_traj_grouping_hook,
)
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig  # noqa: E402
from axpo_rllm.core.config import AXPOConfig  # noqa: E402
from axpo_rllm.core.records import RolloutKind, RowRole  # noqa: E402

pytestmark = pytest.mark.rllm

B = 4
CONFIG = WorkflowConfig(n=4, axpo=AXPOConfig(r=0.5, k=2), agent=AgentConfig(max_tokens_per_turn=40, max_response_tokens=400), seed=5)


def task_dicts(tasks):
    return [{"task_id": t.task_id, "question": t.question, "answer": t.answer, "data_source": t.data_source,
             "images": list(t.images), "choices": t.metadata["choices"]} for t in tasks]


def run_rllm_step(chat, engine, env_factory, config=CONFIG, retry_limit=1, raise_on_error=True):
    from rllm.engine.unified_workflow_engine import UnifiedWorkflowEngine

    coordinator = AXPOStepCoordinator(B, config.axpo, barrier_timeout_s=60)
    wf_engine = UnifiedWorkflowEngine(
        AXPORllmWorkflow,
        {"coordinator": coordinator, "chat": chat, "env_factory": env_factory, "config": config},
        AxpoRllmEngine(engine, chat),
        n_parallel_tasks=B, retry_limit=retry_limit, raise_on_error=raise_on_error,
    )
    # Text-only tasks: unexpanded ids here; the image path (expanded ids, every image's features)
    # is tests/integrations/test_rllm_multimodal.py.
    tasks = make_tasks(B, with_images=False)
    episodes = asyncio.run(wf_engine.execute_tasks(task_dicts(tasks), [t.task_id for t in tasks]))
    return episodes, coordinator


def test_the_estimator_is_registered_on_import():
    from rllm.trainer.algorithms.advantage import get_rllm_adv_estimator

    assert get_rllm_adv_estimator("axpo") is axpo_advantages


def test_axpo_step_through_rllm_matches_the_framework_free_workflow(chat, chat_words, env_factory):
    from rllm.trainer.algorithms.advantage import collect_reward_and_advantage_from_trajectory_groups
    from rllm.trainer.algorithms.config import AlgorithmConfig, TransformConfig
    from rllm.trainer.algorithms.transform import transform_episodes_to_trajectory_groups

    engine = biased(FakeEngine(chat, chat_words), chat, open_rate=0.4, call_rate=0.3, body_rate=0.5)
    episodes, coordinator = run_rllm_step(chat, engine, env_factory)
    assert len(episodes) == B and coordinator.step == 1
    plan = episodes[0].metadata["axpo_plan"]
    assert plan.jobs and all(ep.metadata["axpo_plan"] is plan for ep in episodes)

    # The same step without rllm: identical rollouts, token for token.
    direct = AXPOWorkflow(biased(FakeEngine(chat, chat_words), chat, open_rate=0.4, call_rate=0.3, body_rate=0.5),
                          chat, env_factory, CONFIG).run_step(make_tasks(B, with_images=False), 0)
    rllm_rollouts = {t.metadata["axpo_rollout"].rollout_id: t.metadata["axpo_rollout"] for ep in episodes for t in ep.trajectories}
    assert set(rllm_rollouts) == {r.rollout_id for r in direct.rollouts}
    for r in direct.rollouts:
        assert (rllm_rollouts[r.rollout_id].response_ids == r.response_ids).all()

    groups, _ = transform_episodes_to_trajectory_groups(episodes, TransformConfig(), None, traj_grouping_hook=axpo_traj_grouping_hook)
    assert {g.group_role for g in groups} == {AXPO_ROLE}
    metrics = collect_reward_and_advantage_from_trajectory_groups(groups, AlgorithmConfig(estimator_map={AXPO_ROLE: "axpo"}))
    assert f"advantage/{AXPO_ROLE}/mean" in metrics

    # Advantages and loss windows equal the core's rows of the direct run.
    rows = {row.rollout.rollout_id: row for row in direct.rows}
    jobs = {j.source_id: j for j in plan.jobs}
    seen = 0
    for group in groups:
        for traj in group.trajectories:
            row = rows[traj.uid]
            assert traj.reward == pytest.approx(row.score)
            for step in traj.steps:
                assert step.advantage == pytest.approx(row.segments[0].advantage, abs=1e-6)
            if not row.segments:
                assert not traj.steps
                continue
            seg = row.segments[0]
            first = traj.steps[0]
            assert len(first.prompt_ids) == len(row.rollout.prompt_ids) + max(seg.start, int(np.argmax(row.rollout.response_mask[seg.start:] == 1)) + seg.start)
            last = traj.steps[-1]
            assert len(last.prompt_ids) + len(last.response_ids) - len(row.rollout.prompt_ids) <= seg.end
            if row.role is RowRole.CONTINUATION:
                job = jobs[row.rollout.source_id]
                assert first.prompt_ids == [int(t) for t in job.request_ids]  # prefix = context
                assert group.group_id == f"{job.question_id}/{job.source_id}:{AXPO_ROLE}"
            if row.role is RowRole.SOURCE_PREFIX:
                assert len(last.prompt_ids) + len(last.response_ids) == len(row.rollout.prompt_ids) + jobs[traj.uid].prefix_len
            seen += 1
    assert seen == sum(1 for r in direct.rows if r.segments)
    assert sum(len(g.trajectories) for g in groups) == len(direct.rows)


def test_a_step_past_its_failure_bound_stops_in_the_hook_with_its_reason(chat, chat_words, env_factory):
    """With the launcher's rllm settings (one run per question, a failed run handed over): every
    request of question q1 fails, the step's last run finds the share past max_failed_share, rllm
    turns that run into an error episode, and the grouping hook (on the trainer's path, before any
    advantage or update) stops the step with the failure policy's own message."""
    from rllm.trainer.algorithms.config import TransformConfig
    from rllm.trainer.algorithms.transform import transform_episodes_to_trajectory_groups

    from axpo_rllm.core.failures import StepFailedError

    engine = FakeEngine(chat, chat_words, fail_ids=("q1#",))
    episodes, coordinator = run_rllm_step(chat, engine, env_factory, raise_on_error=False)
    assert len(episodes) == B and coordinator.step == 1, "each question ran once: nothing was planned twice"
    failed = [ep for ep in episodes if "axpo_plan" not in ep.metadata]
    assert len(failed) == 1 and failed[0].info["error"]["error_type"] == "StepFailedError"
    with pytest.raises(StepFailedError, match=r"1 of 4 question runs .* StepFailedError: \d+ of \d+ rollouts failed .*EngineError x"):
        transform_episodes_to_trajectory_groups(episodes, TransformConfig(), None, traj_grouping_hook=axpo_traj_grouping_hook)


def test_rllm_token_engine_routes_a_prefix_family_to_one_server(chat):
    from axpo_rllm.engines.base import GenerationRequest

    class Stub:
        supports_token_in_token_out = True

        def __init__(self):
            self.calls = []

        async def get_token_output_from_token_input(self, token_input, **kwargs):
            self.calls.append(kwargs)

            class Out:
                token_ids, log_probs, stop_reason = [5, 6], [-0.1, -0.2], "stop"

            return Out()

    stub = Stub()
    engine = RllmTokenEngine(stub)
    for rid in ("q0#1/t0", "q0#1~c0/t0", "q0#1~c3/t1"):
        result = asyncio.run(engine.generate(GenerationRequest(prompt_ids=(1, 2), request_id=rid, stop=("</tool_call>",), seed=3)))
        assert result.token_ids == (5, 6) and result.logprobs == (-0.1, -0.2)
    assert {c["application_id"] for c in stub.calls} == {"axpo-q0#1"}
    assert stub.calls[0]["stop"] == ["</tool_call>"] and stub.calls[0]["seed"] == 3


def test_the_barrier_names_the_fix_when_questions_are_missing():
    from axpo_rllm.core.records import QuestionGroup
    from synthetic_rollouts import make_rollout

    coordinator = AXPOStepCoordinator(2, AXPOConfig(r=1.0, k=1), barrier_timeout_s=0.1)
    group = QuestionGroup("q0", (make_rollout("q0#0", "q0", correct=False),))
    with pytest.raises(RuntimeError, match="n_parallel_tasks"):
        asyncio.run(coordinator.submit(group))


def test_streaming_runs_start_certain_continuations_before_the_barrier(chat, chat_words, env_factory):
    """One slow question (q3): with streaming the other runs' certain prefixes are drawn while q3's
    rollouts still run; without it every continuation waits for the barrier. Same step either way."""
    import dataclasses

    def step(streaming):
        engine = DelayedEngine(biased(FakeEngine(chat, chat_words), chat, open_rate=0.5, call_rate=0.3, body_rate=0.5),
                               lambda rid: 0.3 if rid.startswith("q3#") else 0.002)
        config = dataclasses.replace(CONFIG, axpo=dataclasses.replace(CONFIG.axpo, streaming=streaming))
        episodes, _ = run_rllm_step(chat, engine, env_factory, config)
        last_original = max(end for rid, (_, end) in engine.spans.items() if "~c" not in rid)
        first_cont = min(start for rid, (start, _) in engine.spans.items() if "~c" in rid and not rid.startswith("q3#"))
        return episodes, first_cont - last_original

    exact, lead = step("exact")
    assert lead < -0.2, "continuations waited for the slow question"
    assert sum(ep.metrics["workflow/jobs_early"] for ep in exact) >= 1
    batch, lag = step("off")
    assert lag >= 0
    plan_exact, plan_batch = exact[0].metadata["axpo_plan"], batch[0].metadata["axpo_plan"]
    assert [j.job_id for j in plan_exact.jobs] == [j.job_id for j in plan_batch.jobs] and plan_exact.jobs
    tokens = lambda eps: {t.uid: t.metadata["axpo_rollout"].response_ids.tobytes() for ep in eps for t in ep.trajectories}  # noqa: E731
    assert tokens(exact) == tokens(batch)


def test_the_streaming_coordinator_hands_out_certain_jobs_and_the_batch_plan():
    from axpo_rllm.core.planner import plan_resampling
    from axpo_rllm.core.records import QuestionGroup
    from synthetic_rollouts import make_rollout

    def group(qid, c):
        return QuestionGroup(qid, (make_rollout(f"{qid}#0", qid, correct=False, call_body=(c,)),
                                   make_rollout(f"{qid}#1", qid, correct=False)))

    groups = [group("q2", 0.9), group("q0", 0.2), group("q1", 0.5)]
    config = AXPOConfig(r=2 / 6, k=1)  # B = 3, N = 2: E = 2 slots

    async def main():
        coordinator = AXPOStepCoordinator(3, config, barrier_timeout_s=5)
        got: dict[str, list] = {}
        events = []

        def on_jobs(qid):
            return lambda jobs: (got.setdefault(qid, []).extend(jobs), events.append((qid, len(coordinator._groups))))

        runs = []
        for g in groups:
            for r in g.rollouts:
                coordinator.observe(r)
            runs.append(asyncio.ensure_future(coordinator.submit(g, on_jobs(g.question_id))))
            await asyncio.sleep(0)
        return await asyncio.gather(*runs), got, events, coordinator

    results, got, events, coordinator = asyncio.run(main())
    plan = results[0][0]
    reference = plan_resampling(sorted(groups, key=lambda g: g.question_id), config)
    assert [j.job_id for j in plan.jobs] == [j.job_id for j in reference.jobs] == ["q0/q0#0", "q1/q1#0"]
    # q0 (c = 0.2) is certain once only q1 is left running (1 + 0 < 2 slots): before the barrier.
    assert events[0] == ("q0", 2) and [j.job_id for j in got["q0"]] == ["q0/q0#0"]
    assert all(job in plan.jobs for jobs in got.values() for job in jobs)  # the very objects handed out
    assert coordinator.step == 1 and coordinator._planner is None


def test_logprobs_reach_verl_and_back_through_rllms_own_verl_engine():
    """rllm's real ``VerlEngine.get_token_output_from_token_input`` in front of a server manager that
    reads ``logprobs`` with verl's own line (tests/integrations/test_rllm_sampling.py)."""
    import importlib.util
    import re
    from pathlib import Path

    from rllm.engine.rollout.verl_engine import VerlEngine

    from axpo_rllm.engines.base import BackendContractError, GenerationRequest

    path = Path(importlib.util.find_spec("verl").origin).parent / "workers/rollout/vllm_rollout/vllm_async_server.py"
    line = re.search(r'^\s*(sampling_params\["logprobs"\] = .*pop\("logprobs".*)$', path.read_text(), re.M).group(1).strip()

    class ServerManager:
        def __init__(self, drop=False):
            self.drop = drop

        async def generate(self, request_id, prompt_ids, sampling_params, image_data=None, video_data=None):
            scope = {"sampling_params": dict(sampling_params)}
            exec(line, {}, scope)  # noqa: S102 - verl's own reading of the request
            on = scope["sampling_params"]["logprobs"] is not None and not self.drop

            class Out:
                token_ids, stop_reason = [5, 6], "stop"
                log_probs = [-0.1, -0.2] if on else None

            return Out()

    def verl_engine(manager):
        engine = object.__new__(VerlEngine)  # its __init__ wants a live verl rollout; the method under test does not
        engine.server_manager, engine.is_validation = manager, False
        engine.train_sampling_params = dict(temperature=1.0, top_p=1.0, logprobs=1)
        engine.val_sampling_params = dict(engine.train_sampling_params)
        engine.max_prompt_length, engine.max_response_length = 64, 8
        return engine

    request = GenerationRequest(prompt_ids=(1, 2), max_tokens=4, request_id="q0#1/t0")
    ok = asyncio.run(RllmTokenEngine(verl_engine(ServerManager())).generate(request))
    assert ok.logprobs == (-0.1, -0.2)
    with pytest.raises(BackendContractError, match="returned 2 token ids but none log-probs"):
        asyncio.run(RllmTokenEngine(verl_engine(ServerManager(drop=True))).generate(request))


def test_step_diagnostics_reach_every_episode_once_per_step(chat, chat_words, env_factory):
    from axpo_rllm.core.advantages import original_groups
    from axpo_rllm.core.step import finish_step

    engine = biased(FakeEngine(chat, chat_words), chat, open_rate=0.4, call_rate=0.3, body_rate=0.5)
    episodes, _ = run_rllm_step(chat, engine, env_factory)
    rollouts = [t.metadata["axpo_rollout"] for ep in episodes for t in ep.trajectories]
    plan = episodes[0].metadata["axpo_plan"]
    want = finish_step(sorted(original_groups(r for r in rollouts if r.kind is RolloutKind.ORIGINAL), key=lambda g: g.question_id),
                       plan, [r for r in rollouts if r.kind is RolloutKind.CONTINUATION], CONFIG.axpo).diagnostics
    for ep in episodes:  # rllm logs the mean of episode metrics: equal values make it the step's figure
        for key in ("axpo/recovery_rate", "axpo/triggered_questions", "axpo/extra_samples_used", "axpo/failed_rollouts",
                    "axpo/c_selected_mean", "axpo/tool_use_rate"):
            assert ep.metrics[key] == pytest.approx(want[key], nan_ok=True), key


def test_validation_is_plain_rollouts_with_no_barrier(chat, chat_words, env_factory):
    from rllm.engine.unified_workflow_engine import UnifiedWorkflowEngine

    coordinator = AXPOStepCoordinator(B, CONFIG.axpo, barrier_timeout_s=5)
    wf_engine = UnifiedWorkflowEngine(
        AXPORllmWorkflow, {"coordinator": coordinator, "chat": chat, "env_factory": env_factory, "config": CONFIG},
        AxpoRllmEngine(biased(FakeEngine(chat, chat_words), chat, open_rate=0.4, call_rate=0.3), chat),
        n_parallel_tasks=2, retry_limit=1, raise_on_error=True,
    )
    tasks = make_tasks(3, with_images=False)  # fewer questions than a training step, more than the parallel tasks
    n_val = 2
    dicts = [d for d in task_dicts(tasks) for _ in range(n_val)]
    episodes = asyncio.run(wf_engine.execute_tasks(dicts, [d["task_id"] for d in dicts], is_validation=True))
    assert len(episodes) == 6 and coordinator.step == 0, "validation never touches the training step"
    ids = sorted(t.metadata["axpo_rollout"].rollout_id for ep in episodes for t in ep.trajectories)
    assert ids == sorted(f"q{i}#{k}" for i in range(3) for k in range(n_val)), "one plain rollout per run, no continuation"
    groups = axpo_traj_grouping_hook(episodes)
    assert sorted(len(g.trajectories) for g in groups) == [n_val] * 3


def test_a_run_that_fails_releases_the_barrier_with_its_reason():
    from synthetic_rollouts import make_rollout

    from axpo_rllm.core.records import QuestionGroup

    coordinator = AXPOStepCoordinator(2, AXPOConfig(r=1.0, k=1), barrier_timeout_s=60, start_step=7)

    async def main():
        waiter = asyncio.create_task(coordinator.submit(QuestionGroup("q0", (make_rollout("q0#0", "q0", correct=False),))))
        await asyncio.sleep(0.01)
        coordinator.abort("q1", "BackendContractError: no log-probs")
        return await asyncio.wait_for(waiter, 5)

    with pytest.raises(RuntimeError, match=r"AXPO step 7 cannot be planned: question 'q1' failed .*no log-probs"):
        asyncio.run(main())


def test_the_coordinator_cancels_a_speculative_start_the_plan_drops():
    """Speculation through the coordinator: a run hears of its likely prefixes before the barrier
    (``listen``, even while its own rollouts still run) and of the ones the plan can no longer take
    (``on_cancel``); what it keeps is the batch plan's."""
    from axpo_rllm.core.planner import plan_resampling
    from axpo_rllm.core.records import QuestionGroup
    from synthetic_rollouts import make_rollout

    def group(qid, c):
        return QuestionGroup(qid, (make_rollout(f"{qid}#0", qid, correct=False, call_body=(c,)),
                                   make_rollout(f"{qid}#1", qid, correct=False)))

    groups = [group("q0", 0.9), group("q1", 0.2), group("q2", 0.5), group("q3", 0.7)]
    config = AXPOConfig(r=0.25, k=1, speculation="rollout")  # B = 4, N = 2: two slots

    async def main():
        coordinator = AXPOStepCoordinator(4, config, barrier_timeout_s=5, group_size=2)
        running: dict[str, set] = {g.question_id: set() for g in groups}
        history = []
        for g in groups:
            qid = g.question_id
            coordinator.listen(qid, lambda jobs, q=qid: running[q].update(j.job_id for j in jobs),
                               lambda job_id, q=qid: (running[q].remove(job_id), history.append(job_id)))
        coordinator.observe(groups[0].rollouts[0])  # q0's source is graded while q0 still runs
        started_early = set(running["q0"])
        waiters = []
        for g in groups:
            for r in g.rollouts[1:] if g is groups[0] else g.rollouts:
                coordinator.observe(r)
            waiters.append(asyncio.ensure_future(coordinator.submit(g)))
            await asyncio.sleep(0)
        return (await asyncio.gather(*waiters))[0][0], running, history, started_early

    plan, running, history, started_early = asyncio.run(main())
    assert started_early == {"q0/q0#0"}, "a graded source of a running question starts at once"
    assert history == ["q0/q0#0"], "q1 (0.2) and q2 (0.5) displaced it"
    assert [j.job_id for j in plan.jobs] == [j.job_id for j in plan_resampling(groups, config).jobs] == ["q1/q1#0", "q2/q2#0"]
    assert set().union(*running.values()) == {"q1/q1#0", "q2/q2#0"}


def test_speculation_through_rllm_draws_the_barriers_step(chat, chat_words, env_factory):
    import dataclasses

    def step(**axpo):
        engine = DelayedEngine(biased(FakeEngine(chat, chat_words), chat, open_rate=0.5, call_rate=0.3, body_rate=0.5),
                               lambda rid: 0.02 * int(rid[1]))
        config = dataclasses.replace(CONFIG, axpo=dataclasses.replace(CONFIG.axpo, r=0.25, **axpo))
        return run_rllm_step(chat, engine, env_factory, config)[0]

    tokens = lambda eps: {t.uid: t.metadata["axpo_rollout"].response_ids.tobytes() for ep in eps for t in ep.trajectories}  # noqa: E731
    batch = step(streaming="off")
    for speculation in ("group", "rollout"):
        spec = step(speculation=speculation)
        assert [j.job_id for j in spec[0].metadata["axpo_plan"].jobs] == [j.job_id for j in batch[0].metadata["axpo_plan"].jobs]
        assert tokens(spec) == tokens(batch)

"""The streaming planner (core/streaming.py): every prefix it releases early is one the batch plan
selects, for every completion order; its final plan is plan_resampling's (exact) or
plan_first_come's (greedy); and the exact rule releases as much as any exact rule can."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.records import QuestionGroup, Termination
from axpo_rllm.core.streaming import StreamingPlanner, plan_first_come
from synthetic_rollouts import make_rollout

PROBS = (0.2, 0.5, 0.9)  # few values: equal c_s across questions, so ties (kept in input order) are exercised


def signature(job):
    return (job.job_id, job.round, job.k, job.confidence, job.turns_used, job.request_ids.tobytes(),
            job.prefix_mask.tobytes(), job.prefix_logprobs.tobytes(), job.images)


@st.composite
def rollout_spec(draw):
    tool = draw(st.booleans())
    return (tool, draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else False,  # mostly wrong: triggers fire
            draw(st.integers(0, 7)) == 0,  # errored
            tuple(draw(st.sampled_from(PROBS)) for _ in range(draw(st.integers(1, 2)))) if tool else None)


@st.composite
def step_case(draw):
    b, n = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    specs = [[draw(rollout_spec()) for _ in range(n)] for _ in range(b)]
    k = draw(st.integers(1, 3))
    budget = draw(st.integers(k, max(k, b * n + k)))
    config = AXPOConfig(
        r=budget / (b * n), k=k, ranking=draw(st.sampled_from(["uncertainty", "random", "confidence"])),
        seed=draw(st.integers(0, 3)), prefix_fix=draw(st.booleans()),
        resample_target=draw(st.sampled_from(["tool", "tool", "no_tool"])),
    )
    events = draw(st.permutations([i for i in range(b * n) for _ in range(2)]))
    return specs, config, events, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2))


def build_groups(specs, names):
    groups = []
    for qid, rollouts in zip(names, specs):
        groups.append(QuestionGroup(qid, tuple(
            make_rollout(f"{qid}#{i}", qid, correct=correct, call_body=body,
                         termination=Termination.ERROR if error else Termination.ANSWER)
            for i, (tool, correct, error, body) in enumerate(rollouts)
        )))
    return groups


def replay(planner, groups, events, observe, on_event=None, on_jobs=None):
    """Feed the planner in completion order. Each rollout appears twice in ``events``: first its
    first tool call (reported if it has one), then its grade; a question's group is added right
    after its last grade. ``observe`` False: only the groups. Returns the releases and the arrival
    order; ``on_event(seen)`` is called after every event with how far each rollout has got
    (0 nothing, 1 called, 2 graded), ``on_jobs(jobs)`` with what each call to the planner returned."""
    from axpo_rllm.core.planner import mean_probability

    rollouts = [r for g in groups for r in g.rollouts]
    seen = {r.rollout_id: 0 for r in rollouts}
    released, arrival = [], []

    def take(jobs):
        released.extend(jobs)
        if on_jobs is not None:
            on_jobs(jobs)

    for index in events:
        r = rollouts[index]
        g = next(g for g in groups if g.question_id == r.question_id)
        seen[r.rollout_id] += 1
        if seen[r.rollout_id] == 1 and observe and r.used_tool:
            call = r.first_tool_call
            take(planner.observe_call(r.question_id, r.rollout_id, mean_probability(r.response_logprobs[call.body_start:call.end])))
        elif seen[r.rollout_id] == 2:
            take(planner.observe(r) if observe else [])
            if all(seen[x.rollout_id] == 2 for x in g.rollouts):
                take(planner.add(g))
                arrival.append(g.question_id)
        if on_event is not None:
            on_event(seen)
    return released, arrival


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_case())
def test_streaming_plan_equals_the_batch_plan_for_every_completion_order(case):
    specs, config, events, observe, known_order, step = case
    names = [f"q{i}" for i in range(len(specs))]
    if not known_order:
        names = [f"z{(7 * i) % 11}" for i in range(len(specs))]  # learnt as they come; plan order = sorted ids
    groups = build_groups(specs, names)
    for mode in ("exact", "greedy", "off"):
        planner = StreamingPlanner(config, len(groups), len(groups[0].rollouts), step,
                                   order=names if known_order else None, mode=mode)
        released, arrival = replay(planner, groups, events, observe)
        plan = planner.finish()
        ordered = groups if known_order else sorted(groups, key=lambda g: g.question_id)
        if mode == "greedy":
            reference = plan_first_come(ordered, arrival, config, step)
        else:
            reference = plan_resampling(ordered, config, step)
        assert [signature(j) for j in plan.jobs] == [signature(j) for j in reference.jobs]
        assert (plan.budget, plan.triggered) == (reference.budget, reference.triggered)
        final = {j.job_id: signature(j) for j in reference.jobs}
        assert len({j.job_id for j in released}) == len(released), "a job was released twice"
        for job in released:
            assert final.get(job.job_id) == signature(job), f"{mode} released {job.job_id}, not in the plan as released"
        if mode == "off":
            assert not released
        assert planner.remaining(plan) == [j for j in plan.jobs if j.job_id not in {r.job_id for r in released}]


def test_a_wrong_release_is_caught_at_finish():
    groups = build_groups([[(True, False, False, (0.5,))], [(True, False, False, (0.2,))]], ["q0", "q1"])
    planner = StreamingPlanner(AXPOConfig(r=0.5, k=1), 2, 1, order=["q0", "q1"])
    planner.slots = 2  # a broken rule: pretends there is room for both (E = 1 has one slot)
    planner.add(groups[0])
    planner.add(groups[1])
    with pytest.raises(RuntimeError, match="a bug in the release rule"):
        planner.finish()


# -- the rules, case by case -----------------------------------------------------------------------
def tool_group(qid, c, n=2, correct=False):
    """One tool-using rollout with call probability c (the candidate), the rest no-tool."""
    rollouts = [make_rollout(f"{qid}#0", qid, correct=correct, call_body=(c,))]
    rollouts += [make_rollout(f"{qid}#{i}", qid, correct=False) for i in range(1, n)]
    return QuestionGroup(qid, tuple(rollouts))


def test_round_zero_starts_once_candidates_so_far_plus_running_fit_the_slots():
    # B = 4, N = 2, K = 1, E = 2: two slots.
    groups = [tool_group(f"q{i}", c) for i, c in enumerate((0.9, 0.2, 0.5, 0.7))]
    planner = StreamingPlanner(AXPOConfig(r=0.25, k=1), 4, 2, order=[g.question_id for g in groups])
    assert planner.add(groups[0]) == []  # 3 running + itself > 2 slots
    assert planner.add(groups[1]) == []  # 2 running could both rank ahead of q1's c = 0.2
    (job,) = planner.add(groups[2])  # one running: q1 (0.2) is ahead of all but it -> 1 + 0 < 2
    assert job.source_id == "q1#0" and job.round == 0
    assert [j.source_id for j in planner.add(groups[3])] == ["q2#0"]  # all known: q2 (0.5) beats q3 (0.7) and q0
    assert [j.source_id for j in planner.finish().jobs] == ["q1#0", "q2#0"]


def test_a_question_that_can_no_longer_trigger_stops_counting():
    groups = [tool_group("q0", 0.5), tool_group("q1", 0.5, correct=True), tool_group("q2", 0.9)]
    planner = StreamingPlanner(AXPOConfig(r=1 / 3, k=1), 3, 2, order=["q0", "q1", "q2"])  # E = 2
    assert planner.add(groups[0]) == []  # q1 and q2 running: 2 rivals
    (job,) = planner.observe(groups[1].rollouts[0])  # q1's tool rollout is right: q1 never triggers
    assert job.source_id == "q0#0"


def test_a_later_round_is_released_when_all_earlier_rounds_fit():
    # q0 has 3 candidates; B = 3, N = 3, K = 1, E = 9 slots: even if q1 and q2 bring 3 each, all 9 fit.
    q0 = QuestionGroup("q0", tuple(make_rollout(f"q0#{i}", "q0", correct=False, call_body=(c,)) for i, c in enumerate((0.3, 0.6, 0.1))))
    planner = StreamingPlanner(AXPOConfig(r=1.0, k=1), 3, 3, order=["q0", "q1", "q2"])
    released = planner.add(q0)
    assert sorted((j.source_id, j.round) for j in released) == [("q0#0", 1), ("q0#1", 2), ("q0#2", 0)]
    # with 6 slots (E = 6) round 2 of q0 is not certain: two running questions could fill rounds 0-1 and beat it
    planner = StreamingPlanner(AXPOConfig(r=6 / 9, k=1), 3, 3, order=["q0", "q1", "q2"])
    assert sorted(j.round for j in planner.add(q0)) == [0, 1]


def test_graded_keys_bound_a_running_questions_later_rounds():
    # B = 2, N = 3, K = 1, E = 5 slots. q0's round-2 prefix (c = 0.5) has its own 2 earlier rounds
    # and q1's rounds 0-1 ahead of it (4); it is certain once q1's round-2 prefix cannot beat 0.5.
    q0 = QuestionGroup("q0", tuple(make_rollout(f"q0#{i}", "q0", correct=False, call_body=(c,)) for i, c in enumerate((0.1, 0.2, 0.5))))
    q1 = [make_rollout(f"q1#{i}", "q1", correct=False, call_body=(c,)) for i, c in enumerate((0.3, 0.8))]
    planner = StreamingPlanner(AXPOConfig(r=5 / 6, k=1), 2, 3, order=["q0", "q1"])
    assert {j.round for j in planner.add(q0)} == {0, 1}  # q1 could still bring 3 candidates with tiny keys
    assert planner.observe(q1[0]) == []  # 2 ungraded below 0.3: q1's round 2 could be 0.3 < 0.5
    (job,) = planner.observe(q1[1])  # 1 ungraded: q1's round 2 is at least 0.8
    assert (job.source_id, job.round) == ("q0#2", 2)


def test_greedy_takes_round_zero_first_come_and_ignores_later_arrivals():
    groups = [tool_group(f"q{i}", c) for i, c in enumerate((0.9, 0.2, 0.5, 0.7))]
    config = AXPOConfig(r=0.25, k=1, streaming="greedy")  # two slots
    planner = StreamingPlanner(config, 4, 2, order=[g.question_id for g in groups])
    assert [j.source_id for j in planner.add(groups[0])] == ["q0#0"]
    assert [j.source_id for j in planner.add(groups[3])] == ["q3#0"]
    assert planner.add(groups[1]) == [] and planner.add(groups[2]) == []
    plan = planner.finish()
    assert [j.source_id for j in plan.jobs] == ["q0#0", "q3#0"]
    assert [j.source_id for j in plan_resampling(groups, dataclasses.replace(config, streaming="exact")).jobs] == ["q1#0", "q2#0"]


def test_random_ranking_releases_a_single_candidate_before_its_draw_is_known():
    # B = 2, N = 2, K = 1, E = 2. q1's one candidate is round 0 at any offset; q0 (running) can take
    # at most one round-0 slot ahead of it, so it is certain although its key is not known yet.
    q1 = tool_group("q1", 0.5)
    planner = StreamingPlanner(AXPOConfig(r=0.5, k=1, ranking="random"), 2, 2, order=["q0", "q1"])
    assert [j.source_id for j in planner.add(q1)] == ["q1#0"]


def test_random_ranking_releases_once_the_draw_offset_is_known():
    # q1 has two candidates: which one is round 0 depends on the draws at its offset (q0's count).
    q0 = QuestionGroup("q0", (make_rollout("q0#0", "q0", correct=False, call_body=(0.5,)),
                              make_rollout("q0#1", "q0", correct=False)))
    q1 = QuestionGroup("q1", tuple(make_rollout(f"q1#{i}", "q1", correct=False, call_body=(0.5,)) for i in range(2)))
    config = AXPOConfig(r=1.0, k=1, ranking="random", seed=1)  # E = 4: everything fits
    planner = StreamingPlanner(config, 2, 2, order=["q0", "q1"])
    assert len(planner.add(q1)) in (0, 2)  # released only if its rounds are the same at offsets 0..2
    rest = planner.add(q0)
    assert {j.source_id for j in planner.released} == {"q0#0", "q1#0", "q1#1"} and rest
    plan = planner.finish()
    assert [j.source_id for j in plan.jobs] == [j.source_id for j in plan_resampling([q0, q1], config).jobs]


# -- maximality: what the exact rule holds back, some completion of the batch does not select -----
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_case())
def test_the_exact_rule_holds_back_only_what_some_completion_would_not_select(case):
    specs, config, events, observe, _, step = case
    config = dataclasses.replace(config, ranking="uncertainty", resample_target="tool")
    names = [f"q{i}" for i in range(len(specs))]
    groups = build_groups(specs, names)
    n = len(groups[0].rollouts)
    planner = StreamingPlanner(config, len(groups), n, step, order=names)

    def check(seen):
        # The adversary's completion: every rollout not graded yet is tool-using, wrong and eligible;
        # one whose first call was reported keeps that call, any other calls with probability 0.01
        # (ranked before anything real). It is the worst completion for every prefix at once.
        done = {r.rollout_id for g in groups for r in g.rollouts if all(seen[x.rollout_id] == 2 for x in g.rollouts)}
        worst = []
        for g in groups:
            known = lambda r: r.rollout_id in done or (observe and seen[r.rollout_id] == 2)  # noqa: E731
            called = lambda r: observe and seen[r.rollout_id] == 1 and r.used_tool  # noqa: E731
            worst.append(QuestionGroup(g.question_id, tuple(
                r if known(r) else make_rollout(
                    r.rollout_id, g.question_id, correct=False,
                    call_body=tuple(specs[int(g.question_id[1:])][int(r.rollout_id.split("#")[1])][3]) if called(r) else (0.01,))
                for r in g.rollouts)))
        selected = {j.source_id for j in plan_resampling(worst, config, step).jobs}
        # Released iff selected even in the worst completion: no exact rule could release more.
        assert {j.source_id for j in planner.released} == selected & done

    replay(planner, groups, events, observe, check)


def test_a_reported_call_binds_the_rollout():
    g = tool_group("q0", 0.5)
    planner = StreamingPlanner(AXPOConfig(r=0.5, k=1), 2, 2, order=["q0", "q1"])
    planner.observe_call("q0", "q0#0", 0.9)  # a different c than the rollout ends with
    with pytest.raises(RuntimeError, match="report the call from the final attempt only"):
        planner.observe(g.rollouts[0])
    planner = StreamingPlanner(AXPOConfig(r=0.5, k=1), 2, 2, order=["q0", "q1"])
    planner.observe_call("q0", "q0#0", 0.9)
    planner.observe_call("q0", "q0#0", None)  # forgotten (restarted): no claim left
    planner.observe(g.rollouts[0])


def test_in_flight_calls_let_round_zero_start_before_rivals_are_graded():
    # B = 2, N = 2, K = 1, E = 1 slot. q0 is done with c = 0.2; q1's two rollouts are still
    # running but both have called a tool with c = 0.6 and 0.8: q1 cannot beat 0.2.
    q0 = tool_group("q0", 0.2)
    planner = StreamingPlanner(AXPOConfig(r=0.25, k=1), 2, 2, order=["q0", "q1"])
    assert planner.add(q0) == []
    assert planner.observe_call("q1", "q1#0", 0.6) == []  # q1#1 may still call with a tiny c
    (job,) = planner.observe_call("q1", "q1#1", 0.8)
    assert job.source_id == "q0#0"


# -- speculation: likely prefixes start early, the plan and its continuations stay the batch plan's --
def without_round(sig):
    return sig[:1] + sig[2:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_case(), st.sampled_from(["group", "rollout"]))
def test_speculation_keeps_the_batch_plan_and_cancels_exactly_what_it_does_not_take(case, speculation):
    specs, config, events, observe, known_order, step = case
    config = dataclasses.replace(config, ranking="uncertainty" if config.ranking == "random" else config.ranking,
                                 speculation=speculation)
    names = [f"q{i}" for i in range(len(specs))] if known_order else [f"z{(7 * i) % 11}" for i in range(len(specs))]
    groups = build_groups(specs, names)
    planner = StreamingPlanner(config, len(groups), len(groups[0].rollouts), step, order=names if known_order else None)
    running: dict[str, object] = {}
    starts = cancels = 0

    def follow(started):
        nonlocal starts, cancels
        for job in started:
            assert job.job_id not in running, f"{job.job_id} started twice without a cancel between"
            running[job.job_id] = job
            starts += 1
        for job_id in planner.take_cancelled():
            assert job_id in running and job_id not in {j.job_id for j in planner.released}, "a certain job was cancelled"
            del running[job_id]
            cancels += 1

    replay(planner, groups, events, observe, on_jobs=follow)
    plan = planner.finish()
    follow([])
    ordered = groups if known_order else sorted(groups, key=lambda g: g.question_id)
    reference = plan_resampling(ordered, config, step)
    assert [signature(j) for j in plan.jobs] == [signature(j) for j in reference.jobs]
    final = {j.job_id: signature(j) for j in plan.jobs}
    assert set(running) <= set(final), "a started job the plan does not take was left running"
    for job_id, job in running.items():
        assert without_round(signature(job)) == without_round(final[job_id]), "a start asked for other continuations"
    assert [j.job_id for j in planner.remaining(plan)] == [j.job_id for j in plan.jobs if j.job_id not in running]
    assert (planner.speculated >= starts - len(planner.released)) and planner.wasted == cancels


def test_group_speculation_starts_a_triggered_questions_best_prefix_on_arrival():
    # B = 4, N = 2, K = 1, E = 2 (two slots), as in the round-zero test above: exact alone starts
    # nothing on q0's and q1's arrival (running questions could outrank them); speculation starts the
    # optimistic plan's prefixes at once and cancels q0's when q1 and q2 turn out more uncertain.
    groups = [tool_group(f"q{i}", c) for i, c in enumerate((0.9, 0.2, 0.5, 0.7))]
    planner = StreamingPlanner(AXPOConfig(r=0.25, k=1, speculation="group"), 4, 2, order=[g.question_id for g in groups])
    assert [j.source_id for j in planner.add(groups[0])] == ["q0#0"] and planner.released == []
    assert [j.source_id for j in planner.add(groups[1])] == ["q1#0"] and planner.take_cancelled() == []
    assert [j.source_id for j in planner.add(groups[2])] == ["q2#0"]
    assert planner.take_cancelled() == ["q0/q0#0"]  # displaced: q1 (0.2) and q2 (0.5) take both slots
    assert planner.add(groups[3]) == [] and planner.take_cancelled() == []
    plan = planner.finish()
    assert [j.source_id for j in plan.jobs] == ["q1#0", "q2#0"] and planner.remaining(plan) == []
    assert (planner.speculated, planner.wasted) == (3, 1)


def test_rollout_speculation_starts_a_graded_source_before_its_question_completes_and_drops_it_on_untrigger():
    q0 = [make_rollout("q0#0", "q0", correct=False, call_body=(0.3,)), make_rollout("q0#1", "q0", correct=True, call_body=(0.6,))]
    planner = StreamingPlanner(AXPOConfig(r=0.25, k=1, speculation="rollout"), 2, 2, order=["q0", "q1"])
    assert [j.source_id for j in planner.observe(q0[0])] == ["q0#0"]  # q0 may still trigger
    assert planner.observe(q0[1]) == [] and planner.take_cancelled() == ["q0/q0#0"]  # a right tool rollout: no trigger
    off = StreamingPlanner(AXPOConfig(r=0.25, k=1, speculation="rollout", ranking="random"), 2, 2, order=["q0", "q1"])
    assert off.speculation == "off" and off.observe(q0[0]) == []


def test_off_from_a_yaml_override_is_the_string_off():
    """YAML 1.1 reads a bare ``off`` as false; ``algorithm.axpo.streaming=off`` must mean the barrier."""
    from axpo_rllm.configs.loader import axpo_config, load_config

    config = axpo_config(load_config(None, ["algorithm.axpo.streaming=off", "algorithm.axpo.speculation=off"]))
    assert (config.streaming, config.speculation) == ("off", "off")
    assert axpo_config(load_config(None, ["algorithm.axpo.speculation=rollout"])).speculation == "rollout"
    with pytest.raises(ValueError, match="speculation must be off|group|rollout"):
        AXPOConfig(speculation="always")

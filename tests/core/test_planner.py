"""docs/algorithm.md §1–§4: trigger, token-exact prefix, confidence c_s, breadth-first budget, switches, errors."""

import math

import numpy as np
import pytest

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import allocate_breadth_first, check_continuations, extra_budget, is_triggered, plan_resampling, confidence
from axpo_rllm.core.records import Candidate, QuestionGroup, RecordError, Rollout, Termination, ToolCallSpan
from synthetic_rollouts import TOOL_CLOSE, TOOL_OPEN, make_continuation, make_rollout


def group(qid, specs):
    """specs: list of (correct, call_probs or None)."""
    return QuestionGroup(
        qid,
        tuple(make_rollout(f"{qid}-{i}", qid, correct=c, call_body=p) for i, (c, p) in enumerate(specs)),
    )


# §1 ------------------------------------------------------------------------------------------
def test_trigger_needs_a_nonempty_all_wrong_tool_subgroup():
    assert is_triggered(group("a", [(False, [0.5, 0.5]), (True, None), (False, None)]))
    assert not is_triggered(group("b", [(True, [0.5, 0.5]), (False, [0.5, 0.5])])), "one tool rollout is right"
    assert not is_triggered(group("c", [(False, None), (False, None)])), "no tool rollout at all"
    assert is_triggered(group("d", [(False, None), (True, [0.4, 0.4])]), "no_tool")
    assert not is_triggered(group("e", [(True, None), (False, [0.4, 0.4])]), "no_tool")


# §2 ------------------------------------------------------------------------------------------
def test_prefix_is_prompt_plus_response_up_to_and_including_the_call_opener():
    g = group("q", [(False, [0.5, 0.5]), (False, None), (False, None), (False, None)])
    plan = plan_resampling([g], AXPOConfig(r=1.0, k=2))
    (job,) = plan.jobs
    src = g.rollouts[0]
    # think tokens 0..3, <tool_call> at 4: the prefix is response[:5] and ends with the opener.
    assert job.prefix_len == 5
    assert list(job.prefix_ids) == list(src.response_ids[:5])
    assert job.prefix_ids[-1] == TOOL_OPEN and TOOL_CLOSE not in job.prefix_ids
    assert list(job.request_ids) == [1, 2, 3] + list(src.response_ids[:5])
    assert list(job.prefix_logprobs) == list(src.response_logprobs[:5])
    assert job.turns_used == 1


def test_prefix_of_a_later_turn_keeps_earlier_turns_and_their_images_verbatim():
    # turn 0: a malformed call + observation with an image; turn 1: the call AXPO cuts at is the FIRST call.
    ids = list(range(10, 30))
    mask = [1] * 6 + [0] * 4 + [1] * 10
    calls = (ToolCallSpan(2, 3, 6, turn=0, valid=False), ToolCallSpan(12, 13, 16, turn=1, name="crop"))
    r = Rollout("q-0", "q", [1, 2], ids, mask, [-0.1 if m else 0.0 for m in mask], calls, 0.0, False,
                Termination.ANSWER, 2, images=("task_img", "tool_img", "late_img"), image_offsets=(-1, 8, 17))
    others = [make_rollout(f"q-{i}", "q", correct=False) for i in range(1, 4)]
    plan = plan_resampling([QuestionGroup("q", (r, *others))], AXPOConfig(r=1.0, k=2))
    (job,) = plan.jobs
    assert job.prefix_len == 3, "the prefix ends at the body of the first call, valid or not"
    assert job.images == ("task_img",)
    assert job.turns_used == 1


def test_prefix_images_include_earlier_tool_outputs():
    ids = list(range(10, 30))
    mask = [1] * 4 + [0] * 4 + [1] * 12
    calls = (ToolCallSpan(12, 13, 16, turn=1, name="crop"),)
    r = Rollout("q-0", "q", [1], ids, mask, [-0.1 if m else 0.0 for m in mask], calls, 0.0, False,
                Termination.ANSWER, 2, images=("task", "obs", "after"), image_offsets=(-1, 5, 18))
    others = [make_rollout(f"q-{i}", "q", correct=False) for i in range(1, 4)]
    (job,) = plan_resampling([QuestionGroup("q", (r, *others))], AXPOConfig(r=1.0, k=2)).jobs
    assert job.images == ("task", "obs")
    assert job.turns_used == 2


# §3 ------------------------------------------------------------------------------------------
def test_confidence_is_mean_probability_of_the_call_body_including_the_closer():
    r = make_rollout("x", "q", correct=False, call_body=[0.2, 0.4, 0.9])
    assert confidence(r) == pytest.approx((0.2 + 0.4 + 0.9) / 3, abs=1e-6)


def test_confidence_ignores_observation_tokens_in_the_no_tool_window():
    r = make_rollout("x", "q", correct=False, tail=4)
    assert confidence(r, "no_tool") == pytest.approx(math.exp(-0.2), abs=1e-6)


# §4 ------------------------------------------------------------------------------------------
def test_budget_is_floor_r_b_n():
    assert extra_budget(0.25, 256, 8) == 512
    assert extra_budget(0.1, 30, 10) == 30  # 0.1*30*10 = 29.999999999999996 in floats
    assert extra_budget(0.25, 3, 7) == 5


def test_breadth_first_allocation_order_and_all_or_none():
    def cand(q, s, c):
        return Candidate(q, s, 5, c, c)

    candidates = {
        "q1": [cand("q1", "a", 0.2), cand("q1", "b", 0.3), cand("q1", "c", 0.35)],
        "q2": [cand("q2", "d", 0.1), cand("q2", "e", 0.8)],
        "q3": [cand("q3", "f", 0.5)],
    }
    picked = allocate_breadth_first(candidates, budget=18, k=4)  # room for 4 prefixes, 2 samples left over
    assert [(c.source_id, rnd) for c, rnd in picked] == [("d", 0), ("a", 0), ("f", 0), ("b", 1)]
    assert len(allocate_breadth_first(candidates, budget=3, k=4)) == 0
    assert len(allocate_breadth_first(candidates, budget=400, k=4)) == 6, "stops when no candidate is left"


def test_plan_spends_at_most_the_budget_and_reports_it():
    groups = [group(f"q{i}", [(False, [0.1 + 0.1 * i, 0.5])] * 3 + [(True, None)] * 5) for i in range(4)]
    cfg = AXPOConfig(r=0.25, k=3)  # E = floor(0.25*4*8) = 8 -> two prefixes of 3
    plan = plan_resampling(groups, cfg)
    assert plan.budget == 8 and plan.used == 6 and len(plan.jobs) == 2
    assert [j.question_id for j in plan.jobs] == ["q0", "q1"], "the most uncertain questions go first"
    assert set(plan.triggered) == {"q0", "q1", "q2", "q3"}
    assert len(plan.candidates) == 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ranking_is_seeded(seed):
    groups = [group(f"q{i}", [(False, [0.1 * (j + 1), 0.5]) for j in range(4)] + [(True, None)] * 4) for i in range(6)]
    cfg = AXPOConfig(r=0.25, k=2, ranking="random", seed=seed)
    a = [j.source_id for j in plan_resampling(groups, cfg).jobs]
    b = [j.source_id for j in plan_resampling(groups, cfg).jobs]
    assert a == b
    others = {tuple(j.source_id for j in plan_resampling(groups, AXPOConfig(r=0.25, k=2, ranking="random", seed=s)).jobs) for s in range(10)}
    assert len(others) > 1


def test_confidence_ranking_reverses_uncertainty():
    g = [group("q", [(False, [0.1, 0.1]), (False, [0.9, 0.9]), (False, [0.5, 0.5]), (True, None)])]
    unc = plan_resampling(g, AXPOConfig(r=0.5, k=2)).jobs
    conf = plan_resampling(g, AXPOConfig(r=0.5, k=2, ranking="confidence")).jobs
    assert unc[0].source_id == "q-0" and conf[0].source_id == "q-1"


def test_prefix_fix_off_buys_fresh_rollouts_from_the_question():
    g = [group("q", [(False, [0.1, 0.1]), (True, None), (False, None), (False, None)])]
    (job,) = plan_resampling(g, AXPOConfig(r=0.5, k=2, prefix_fix=False)).jobs
    assert job.prefix_len == 0 and list(job.request_ids) == [1, 2, 3] and job.turns_used == 0


def test_no_tool_target_cuts_where_the_rollout_answers():
    g = [group("q", [(False, None), (False, [0.3, 0.3]), (False, None), (True, [0.9, 0.9])])]
    plan = plan_resampling(g, AXPOConfig(r=0.5, k=2, resample_target="no_tool"))
    assert [j.source_id for j in plan.jobs] == ["q-0"] and plan.jobs[0].prefix_len == 4
    assert not plan_resampling(g, AXPOConfig(r=0.5, k=2)).jobs, "the tool subgroup has a correct rollout"


def test_errored_rollouts_trigger_but_are_never_sources():
    bad = make_rollout("q-0", "q", correct=False, call_body=[0.1, 0.1], termination=Termination.ERROR)
    ok = make_rollout("q-1", "q", correct=False, call_body=[0.9, 0.9])
    plan = plan_resampling([QuestionGroup("q", (bad, ok))], AXPOConfig(r=1.0, k=2))
    assert [j.source_id for j in plan.jobs] == ["q-1"]


def test_grpo_mode_plans_nothing():
    g = [group("q", [(False, [0.1, 0.1]), (False, None)])]
    plan = plan_resampling(g, AXPOConfig(enable=False))
    assert plan.jobs == () and plan.budget == 0 and plan.used == 0


# Errors ----------------------------------------------------------------------------------------
def test_k_above_the_budget_is_a_clear_error():
    g = [group("q", [(False, [0.1, 0.1]), (False, None)])]
    with pytest.raises(ValueError, match=r"E = floor\(r·B·N\).*below K = 4"):
        plan_resampling(g, AXPOConfig(r=0.25, k=4))


def test_tool_span_outside_the_response_is_rejected():
    with pytest.raises(RecordError, match="outside the response"):
        Rollout("x", "q", [1], [1, 2, 3], [1, 1, 1], [-0.1] * 3, (ToolCallSpan(1, 2, 5, turn=0),), 0.0, False, "answer", 1)


def test_tool_span_over_observation_tokens_is_rejected():
    with pytest.raises(RecordError, match="observation tokens"):
        Rollout("x", "q", [1], [1, 2, 3], [1, 0, 1], [-0.1, 0, -0.1], (ToolCallSpan(0, 1, 3, turn=0),), 0.0, False, "answer", 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(response_mask=[1, 1]), "same length"),
        (dict(response_mask=[1, 2, 1]), "only 0 and 1"),
        (dict(response_logprobs=[0.5, -1, -1]), "log-probabilities"),
        (dict(response_logprobs=[float("nan"), -1, -1]), "log-probabilities"),
        (dict(images=("img",)), "image_offsets"),
        (dict(answer_start=9), "answer_start"),
        (dict(prefix_len=2), "must not have"),
    ],
)
def test_inconsistent_rollouts_name_the_bad_value(kwargs, match):
    base = dict(rollout_id="x", question_id="q", prompt_ids=[1], response_ids=[1, 2, 3], response_mask=[1, 1, 1],
                response_logprobs=[-0.1] * 3, tool_calls=(), reward=0.0, correct=False, termination="answer", turns=1)
    base.update(kwargs)
    with pytest.raises(RecordError, match=match):
        Rollout(**base)


def test_groups_of_different_sizes_are_rejected():
    with pytest.raises(ValueError, match="different sizes"):
        plan_resampling([group("a", [(False, [0.1, 0.1])] * 2), group("b", [(False, None)] * 3)], AXPOConfig(r=1.0, k=1))


def test_unknown_config_keys_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match="unknown keys"):
        AXPOConfig.from_mapping({"rr": 0.3})
    with pytest.raises(ValueError, match="ranking"):
        AXPOConfig(ranking="entropy")
    assert AXPOConfig.from_mapping({"k": 2, "r": 0.5}).k == 2


def test_continuations_must_match_the_plan():
    g = [group("q", [(False, [0.5, 0.5]), (True, None), (False, None), (False, None)])]
    plan = plan_resampling(g, AXPOConfig(r=0.5, k=2))
    src = g[0].rollouts[0]
    good = [make_continuation(src, 5, i, correct=False) for i in range(2)]
    assert len(check_continuations(plan, good)["q-0"]) == 2
    with pytest.raises(RecordError, match="planned K = 2 continuations but 1"):
        check_continuations(plan, good[:1])
    with pytest.raises(RecordError, match="token-exact"):
        check_continuations(plan, [good[0], make_continuation(src, 4, 1, correct=False)])
    stranger = make_continuation(g[0].rollouts[2], 3, 0, correct=False)
    with pytest.raises(RecordError, match="did not select"):
        check_continuations(plan, good + [stranger])

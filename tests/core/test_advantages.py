"""docs/algorithm.md §6 by hand: every equation with the numbers written out, every switch, every mask.

The step used throughout (N = 4, B = 2, r = 0.25 -> E = 2, K = 2):
    q0: a (tool, wrong, c = 0.5)  b (tool, wrong, c = 0.9)  c (no tool, right)  d (no tool, wrong)
    q1: e (right)  f, g, h (wrong)            -- no tool use: not triggered
Only a is selected (E = 2 = K). Its continuations: a/c0 right, a/c1 wrong -> r_prefix(a) = 1.
Response of a: think [0, 4), <tool_call> at 4, body [5, 7), observation [7, 10), answer [10, 13).
"""

import math

import numpy as np
import pytest
import torch

from axpo_rllm.core.advantages import build_training_rows, group_normalize, token_arrays
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import plan_resampling
from axpo_rllm.core.diagnostics import step_diagnostics
from axpo_rllm.core.records import QuestionGroup, RowRole, Termination
from synthetic_rollouts import make_continuation, make_rollout

EPS = 1e-6


def worked_groups():
    q0 = QuestionGroup("q0", (
        make_rollout("a", "q0", correct=False, call_body=[0.5, 0.5]),
        make_rollout("b", "q0", correct=False, call_body=[0.9, 0.9]),
        make_rollout("c", "q0", correct=True),
        make_rollout("d", "q0", correct=False),
    ))
    q1 = QuestionGroup("q1", tuple(make_rollout(x, "q1", correct=(x == "e")) for x in "efgh"))
    return q0, q1


def step(**switches):
    q0, q1 = worked_groups()
    cfg = AXPOConfig(r=0.25, k=2, **switches)
    plan = plan_resampling([q0, q1], cfg)
    conts = []
    for job in plan.jobs:
        src = q0.rollouts[0] if job.source_id == "a" else q0.rollouts[1]
        conts += [make_continuation(src, job.prefix_len, i, correct=(i == 0)) for i in range(job.k)]
    rows = build_training_rows([q0, q1], plan, conts, cfg)
    return plan, conts, {row.rollout.rollout_id: row for row in rows}, rows


def adv(row):
    (seg,) = row.segments
    return seg.advantage


def test_plan_selects_only_the_most_uncertain_source():
    plan, conts, rows, _ = step()
    assert [j.source_id for j in plan.jobs] == ["a"] and plan.budget == 2 and plan.used == 2
    assert len(rows) == 8 + 2


def test_continuation_group_equation():
    # A^res_k = (r_k - mean) / (std + eps): rewards [1, 0] -> mean 0.5, unbiased std sqrt(0.5) = 0.7071068
    _, _, rows, _ = step()
    assert adv(rows["a/c0"]) == pytest.approx(0.5 / (math.sqrt(0.5) + EPS), abs=1e-6)  # +0.7071058
    assert adv(rows["a/c0"]) == pytest.approx(0.7071058, abs=1e-6)
    assert adv(rows["a/c1"]) == pytest.approx(-0.7071058, abs=1e-6)
    assert rows["a/c0"].adv_group == rows["a/c1"].adv_group == "q0::a"


def test_recovery_reward_replaces_the_source_in_its_group():
    # q0 with a's reward replaced by r_prefix = 1: [1, 0, 1, 0] -> mean 0.5, std sqrt(1/3) = 0.5773503
    _, _, rows, _ = step()
    assert rows["a"].role is RowRole.SOURCE_PREFIX and rows["a"].score == 1.0
    expected = 0.5 / (math.sqrt(1 / 3) + EPS)  # 0.8660239
    assert adv(rows["a"]) == pytest.approx(0.8660239, abs=1e-6) == pytest.approx(expected, abs=1e-6)
    assert adv(rows["b"]) == pytest.approx(-0.8660239, abs=1e-6), "the others use mean' and std'"
    assert adv(rows["c"]) == pytest.approx(0.8660239, abs=1e-6)
    assert adv(rows["d"]) == pytest.approx(-0.8660239, abs=1e-6)


def test_untriggered_group_is_plain_grpo():
    # q1: [1, 0, 0, 0] -> mean 0.25, std sqrt(0.25) = 0.5: e = 0.75/0.5 = 1.5, others -0.5
    _, _, rows, _ = step()
    assert adv(rows["e"]) == pytest.approx(0.75 / (0.5 + EPS), abs=1e-6)  # 1.4999970
    for x in "fgh":
        assert adv(rows[x]) == pytest.approx(-0.4999990, abs=1e-6)
        assert rows[x].role is RowRole.ORDINARY


def test_masks_prefix_for_the_source_continuation_for_the_resamples():
    _, _, rows, ordered = step()
    advantages, loss_mask = token_arrays(ordered)
    i = {r.rollout.rollout_id: n for n, r in enumerate(ordered)}
    # source: its prefix [0, 5) learns (think + <tool_call>); its own call, observation, answer do not
    assert loss_mask[i["a"]].tolist()[:13] == [1] * 5 + [0] * 8
    assert torch.allclose(advantages[i["a"], :5], torch.full((5,), 0.8660239), atol=1e-6)
    assert advantages[i["a"], 5:].abs().sum() == 0
    # continuation: prefix [0, 5) is context, the 5 new tokens learn
    assert loss_mask[i["a/c0"]].tolist()[:10] == [0] * 5 + [1] * 5
    assert advantages[i["a/c0"], :5].abs().sum() == 0
    # an ordinary tool rollout: observation tokens [7, 10) never learn
    assert loss_mask[i["b"]].tolist()[:13] == [1] * 7 + [0] * 3 + [1] * 3
    # padding never learns
    assert loss_mask[i["c"]].tolist()[7:] == [0] * (loss_mask.shape[1] - 7)


def test_without_prefix_credit_the_source_keeps_its_reward_and_full_trajectory():
    _, _, rows, _ = step(prefix_credit=False)
    a = rows["a"]
    assert a.role is RowRole.ORDINARY and a.score == 0.0
    assert [(s.start, s.end) for s in a.segments] == [(0, 13)]
    # q0 = [0, 0, 1, 0]: mean 0.25, std 0.5
    assert adv(a) == pytest.approx(-0.4999990, abs=1e-6)
    assert adv(rows["c"]) == pytest.approx(1.4999970, abs=1e-6)
    assert adv(rows["a/c0"]) == pytest.approx(0.7071058, abs=1e-6), "continuations are unchanged"


def test_without_separate_groups_continuations_join_the_question():
    # q0 = a(1 replaced), b 0, c 1, d 0, a/c0 1, a/c1 0: mean 0.5, std sqrt(1.5/5) = 0.5477226
    _, _, rows, _ = step(separate_groups=False)
    assert rows["a/c0"].adv_group == "q0"
    assert adv(rows["a/c0"]) == pytest.approx(0.5 / (math.sqrt(0.3) + EPS), abs=1e-6)  # 0.9128692
    assert adv(rows["a/c0"]) == pytest.approx(0.9128692, abs=1e-6)
    assert adv(rows["a"]) == pytest.approx(0.9128692, abs=1e-6)
    assert adv(rows["d"]) == pytest.approx(-0.9128692, abs=1e-6)


def test_source_tail_keep_restores_the_pre_replacement_advantage_on_the_tail():
    _, _, rows, _ = step(source_tail="keep")
    head, tail = rows["a"].segments
    assert (head.start, head.end, tail.start, tail.end) == (0, 5, 5, 13)
    assert head.advantage == pytest.approx(0.8660239, abs=1e-6)
    assert tail.advantage == pytest.approx(-0.4999990, abs=1e-6)  # a's GRPO advantage in [0, 0, 1, 0]


def test_no_recovery_gives_zero_prefix_reward():
    q = QuestionGroup("q", tuple(make_rollout(f"s{i}", "q", correct=False, call_body=[0.5, 0.5]) for i in range(4)))
    cfg = AXPOConfig(r=0.5, k=2)
    plan = plan_resampling([q], cfg)
    conts = [make_continuation(q.rollouts[0], plan.jobs[0].prefix_len, i, correct=False) for i in range(2)]
    rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan, conts, cfg)}
    assert rows["s0"].score == 0.0
    # all-zero groups: every advantage is exactly 0 (the signal AXPO failed to recover)
    assert all(adv(r) == 0.0 for r in rows.values())


def test_binary_rewards_r_prefix_is_one_iff_any_continuation_is_correct():
    """The paper's case, every pattern of K = 4 continuation outcomes: r_prefix = max_k r_k = 1 iff any is correct."""
    from itertools import product

    q = QuestionGroup("q", tuple(make_rollout(f"s{i}", "q", correct=False, call_body=[0.5, 0.5]) for i in range(4)))
    cfg = AXPOConfig(r=1.0, k=4)
    plan = plan_resampling([q], cfg)
    (job,) = plan.jobs
    source = next(r for r in q.rollouts if r.rollout_id == job.source_id)
    for outcome in product([False, True], repeat=4):
        conts = [make_continuation(source, job.prefix_len, i, correct=ok) for i, ok in enumerate(outcome)]
        rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan, conts, cfg)}
        assert rows[job.source_id].score == float(any(outcome)), outcome


def test_graded_rewards_r_prefix_is_the_best_continuation_reward():
    """Token-F1 rewards (MMSearch-style; ``correct`` = exact match), N = 4, B = 1, r = 1 -> E = 4 = K:
        q: a (tool, F1 0.6, c = 0.5)  b (tool, F1 0.2, c = 0.9)  c (no tool, exact, F1 1.0)  d (no tool, F1 0.0)
    The tool subgroup {a, b} has no exact match: q triggers, a (least confident) gets K = 4
    continuations with F1 0.9, 0.7, 0.5, 0.3 (none exact).
      r_prefix(a) = max = 0.9 -> q's scores [0.9, 0.2, 1.0, 0.0]: mean 0.525, Bessel std 0.4991660
        A(a) = 0.375 / 0.4991670 = +0.7512516 (prefix tokens), b = -0.6510847, c = +0.9515854, d = -1.0517523
      (an exact-match r_prefix would give 0 -> [0, 0.2, 1.0, 0]: A(a) = -0.6301247, the prefix pushed down)
      continuation group [0.9, 0.7, 0.5, 0.3]: mean 0.6, std 0.2581989 -> ±1.1618905, ±0.3872968
    """
    import dataclasses

    def graded(rollout, f1, exact=False):
        return dataclasses.replace(rollout, reward=f1, correct=exact)

    q = QuestionGroup("q", (
        graded(make_rollout("a", "q", correct=False, call_body=[0.5, 0.5]), 0.6),
        graded(make_rollout("b", "q", correct=False, call_body=[0.9, 0.9]), 0.2),
        graded(make_rollout("c", "q", correct=True), 1.0, exact=True),
        graded(make_rollout("d", "q", correct=False), 0.0),
    ))
    cfg = AXPOConfig(r=1.0, k=4)
    plan = plan_resampling([q], cfg)
    assert [j.source_id for j in plan.jobs] == ["a"]
    conts = [graded(make_continuation(q.rollouts[0], plan.jobs[0].prefix_len, i, correct=False), f1)
             for i, f1 in enumerate([0.9, 0.7, 0.5, 0.3])]
    rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan, conts, cfg)}
    assert rows["a"].role is RowRole.SOURCE_PREFIX and rows["a"].score == pytest.approx(0.9)
    for rid, want in {"a": 0.7512516, "b": -0.6510847, "c": 0.9515854, "d": -1.0517523,
                      "a/c0": 1.1618905, "a/c1": 0.3872968, "a/c2": -0.3872968, "a/c3": -1.1618905}.items():
        assert adv(rows[rid]) == pytest.approx(want, abs=1e-6), rid


def test_fresh_rollouts_when_the_prefix_fix_is_off():
    _, conts, rows, _ = step(prefix_fix=False)
    assert rows["a"].role is RowRole.ORDINARY, "nothing to credit: the prefix is empty"
    assert [(s.start, s.end) for s in rows["a/c0"].segments] == [(0, 5)]
    assert adv(rows["a/c0"]) == pytest.approx(0.7071058, abs=1e-6)


def test_grpo_mode_is_plain_grpo_everywhere():
    plan, conts, rows, _ = step(enable=False)
    assert not plan.jobs and not conts
    assert adv(rows["a"]) == pytest.approx(-0.4999990, abs=1e-6)
    assert all(r.role is RowRole.ORDINARY for r in rows.values())


def test_over_turn_rollouts_stay_in_the_statistics_but_not_in_the_loss():
    q = QuestionGroup("q", (
        make_rollout("x", "q", correct=True),
        make_rollout("y", "q", correct=False, termination=Termination.OVER_TURN),
    ))
    rows = build_training_rows([q], plan_resampling([q], AXPOConfig(enable=False)), [], AXPOConfig(enable=False))
    assert rows[1].segments == ()
    assert rows[0].segments[0].advantage == pytest.approx(0.5 / (math.sqrt(0.5) + EPS), abs=1e-6)


def test_failed_rollouts_leave_the_statistics_and_the_loss():
    """Failure policy (core.failures): a failed rollout is its own group with score 0."""
    q = QuestionGroup("q", (
        make_rollout("x", "q", correct=True),
        make_rollout("z", "q", correct=False),
        make_rollout("w", "q", correct=False),
        make_rollout("y", "q", correct=False, termination=Termination.ERROR),
    ))
    rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan_resampling([q], AXPOConfig(enable=False)), [], AXPOConfig(enable=False))}
    assert rows["y"].segments == () and rows["y"].score == 0.0 and rows["y"].adv_group != "q"
    # mean over x, z, w = 1/3, Bessel std = sqrt(1/3): x = (2/3)/0.57735 = 1.1547, z = w = -0.57735
    assert rows["x"].segments[0].advantage == pytest.approx(1.1547005, abs=1e-5)
    assert rows["z"].segments[0].advantage == pytest.approx(-0.5773503, abs=1e-5)


def test_group_normalize_matches_the_textbook_formula():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0])
    index = torch.tensor([0, 0, 0, 1, 2])
    out = group_normalize(scores, index)
    g0 = np.array([1.0, 0.0, 0.0])
    want0 = (g0 - g0.mean()) / (g0.std(ddof=1) + EPS)
    assert np.allclose(out[:3].numpy(), want0, atol=1e-6)
    assert out[3].item() == pytest.approx(2.0 / (1 + EPS)) and out[4].item() == pytest.approx(5.0 / (1 + EPS)), "singleton: mean 0, std 1"
    biased = group_normalize(scores, index, unbiased=False)
    assert np.allclose(biased[:3].numpy(), (g0 - g0.mean()) / (g0.std() + EPS), atol=1e-6)
    centred = group_normalize(scores, index, norm_by_std=False)
    assert np.allclose(centred[:3].numpy(), g0 - g0.mean())


def test_diagnostics_of_the_worked_step():
    plan, conts, _, _ = step()
    d = step_diagnostics(list(worked_groups()), plan, conts, AXPOConfig(r=0.25, k=2))
    assert d["axpo/tool_use_rate"] == pytest.approx(2 / 8)
    assert d["axpo/all_wrong_rate"] == 1.0 and d["axpo/all_wrong_share_of_questions"] == 0.5
    assert d["axpo/triggered_questions"] == 1 and d["axpo/prefixes_selected"] == 1
    assert d["axpo/extra_samples_used"] == 2 and d["axpo/budget_used_fraction"] == 1.0
    assert d["axpo/recovery_rate"] == 1.0
    assert d["axpo/c_selected_mean"] == pytest.approx(0.5) and d["axpo/c_unselected_mean"] == pytest.approx(0.9)
    assert d["axpo/acc_tool"] == 0.0 and d["axpo/acc_no_tool"] == pytest.approx(2 / 6)


def test_over_turn_continuations_are_counted_but_masked():
    q = QuestionGroup("q", tuple(make_rollout(f"s{i}", "q", correct=False, call_body=[0.5, 0.5]) for i in range(4)))
    cfg = AXPOConfig(r=0.5, k=2)
    plan = plan_resampling([q], cfg)
    good = make_continuation(q.rollouts[0], plan.jobs[0].prefix_len, 0, correct=True)
    bad = make_continuation(q.rollouts[0], plan.jobs[0].prefix_len, 1, correct=False)
    object.__setattr__(bad, "termination", Termination.OVER_TURN)
    rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan, [good, bad], cfg)}
    assert rows[bad.rollout_id].segments == ()
    assert adv(rows[good.rollout_id]) == pytest.approx(0.7071058, abs=1e-6), "the masked one still counts in the group"
    assert rows["s0"].score == 1.0


def test_failed_continuations_leave_the_group_and_r_prefix():
    q = QuestionGroup("q", tuple(make_rollout(f"s{i}", "q", correct=False, call_body=[0.5, 0.5]) for i in range(4)))
    cfg = AXPOConfig(r=0.5, k=2)
    plan = plan_resampling([q], cfg)
    cut = plan.jobs[0].prefix_len
    good, bad = (make_continuation(q.rollouts[0], cut, i, correct=i == 0) for i in range(2))
    object.__setattr__(bad, "termination", Termination.ERROR)
    rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan, [good, bad], cfg)}
    assert rows[bad.rollout_id].segments == () and rows[bad.rollout_id].score == 0.0
    assert adv(rows[good.rollout_id]) == pytest.approx(1 / (1 + EPS), abs=1e-6), "alone in its group: verl's singleton rule"
    assert rows["s0"].role is RowRole.SOURCE_PREFIX and rows["s0"].score == 1.0


def test_a_prefix_whose_continuations_all_failed_earns_no_credit():
    q = QuestionGroup("q", tuple(make_rollout(f"s{i}", "q", correct=False, call_body=[0.5, 0.5]) for i in range(4)))
    cfg = AXPOConfig(r=0.5, k=2)
    plan = plan_resampling([q], cfg)
    conts = [make_continuation(q.rollouts[0], plan.jobs[0].prefix_len, i, correct=True) for i in range(2)]
    for c in conts:
        object.__setattr__(c, "termination", Termination.ERROR)
    rows = {r.rollout.rollout_id: r for r in build_training_rows([q], plan, conts, cfg)}
    assert rows["s0"].role is RowRole.ORDINARY and rows["s0"].score == 0.0
    assert rows["s0"].segments[0] == (0, len(q.rollouts[0].response_ids), rows["s0"].segments[0].advantage)
    d = step_diagnostics([q], plan, conts, cfg)
    assert math.isnan(d["axpo/recovery_rate"]) and d["axpo/failed_rollouts"] == 2

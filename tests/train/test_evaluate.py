"""Pass@k: the unbiased estimator, and scores per task family."""

from __future__ import annotations

import itertools
import math

import pytest

from axpo_rllm.train.evaluate import group_scores, pass_at_k
from axpo_rllm.core.records import QuestionGroup
from synthetic_rollouts import make_rollout


def brute_force(n: int, c: int, k: int) -> float:
    """P(at least one correct among k drawn without replacement), by enumeration."""
    outcomes = [1] * c + [0] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in d) for d in draws) / len(draws)


@pytest.mark.parametrize("n,c,k", [(4, 0, 4), (4, 1, 4), (8, 2, 4), (8, 5, 4), (6, 1, 1), (5, 3, 2), (10, 0, 1)])
def test_pass_at_k_equals_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k))


def test_pass_at_1_is_mean_accuracy_and_bad_input_is_refused():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def group(qid: str, correct: list[bool], tool: list[bool]) -> QuestionGroup:
    return QuestionGroup(qid, tuple(make_rollout(f"{qid}#{i}", qid, correct=c, call_body=(0.5, 0.5) if t else None) for i, (c, t) in enumerate(zip(correct, tool))))


def test_group_scores_overall_and_per_family():
    groups = [
        group("a", [True, False, False, False], [True, True, False, False]),
        group("b", [False] * 4, [False] * 4),
        group("c", [True] * 4, [True] * 4),
    ]
    family = {"a": "code", "b": "code", "c": "color"}.get
    s = group_scores(groups, family, k=4)
    assert s["eval/pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert s["eval/pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert s["eval/tool_use_rate"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["eval/acc_tool"] == pytest.approx(5 / 6)
    assert s["eval/acc_no_tool"] == pytest.approx(0.0)
    assert s["eval/code/pass@1"] == pytest.approx(0.125) and s["eval/code/questions"] == 2
    assert s["eval/color/pass@4"] == 1.0
    assert math.isnan(s["eval/color/acc_no_tool"])

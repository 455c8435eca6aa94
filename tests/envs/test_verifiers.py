"""Verifiers, final-answer extraction and the grader's failure accounting.

Cases are our own, in the spirit of Math-Verify's suite (percent conventions, nested boxed,
timeouts) and the SQuAD normalisation used by search-QA benchmarks.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from axpo_rllm.envs import verifiers as V
from axpo_rllm.envs.verifiers import (
    DeadlinePool,
    Grader,
    GraderCrash,
    GraderStats,
    GraderTimeout,
    extract_boxed,
    extract_choice,
    extract_final_answer,
    get_verifier,
    normalize_text,
    parse_number,
    token_f1,
)


@pytest.fixture(scope="module")
def pool():
    pool = DeadlinePool(size=2)
    yield pool
    pool.close()


@pytest.fixture
def grader(pool):
    return Grader(timeout_s=20.0, stats=GraderStats(), pool=pool)


# ---------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"$\boxed 5$", "5"),
        (r"\fbox{3}", "3"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{ \text{east} }", r"\text{east}"),
        (r"\boxed{unclosed", None),
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


balanced = st.recursive(
    st.text(alphabet="ab12+-^ ", max_size=6),
    lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda parts: "{" + "".join(parts) + "}"),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(alphabet="xyz =.", max_size=8), body=st.lists(balanced, max_size=4).map("".join))
def test_extract_boxed_roundtrips_balanced_content(prefix, body):
    assert extract_boxed(f"{prefix}\\boxed{{{body}}} trailing") == body.strip()


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>maybe \\boxed{3}</think>The result is \\boxed{4}", "4"),
        ("<think>draft: \\boxed{3}</think>I am not sure.", None),
        ("<think>x</think><answer>Paris</answer>", "Paris"),
        ("<answer>so \\boxed{7}</answer>", "7"),
        ("Step 1 ... Answer: 42.", "42"),
        ("The final answer is $7$.", "7"),
        ("**Answer:** B", "B"),
        ("Final answer: (C) blue\nThanks", "(C) blue"),
        ("I think it is 5", None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("1,234.5", (1234.5, False)), ("-3/4", (-0.75, False)), (r"\frac{3}{4}", (0.75, False)), (r"-\frac{1}{2}", (-0.5, False)),
     ("50%", (50.0, True)), (r"12.5\%", (12.5, True)), ("$1.2e3$", (1200.0, False)), ("about 7 cm", (7.0, False)), ("none", None), ("1/0", None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_normalize_and_f1():
    assert normalize_text("The  Eiffel-Tower!") == "eiffeltower"
    assert token_f1("the big red barn", "red barn") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "y") == 0.0


@pytest.mark.parametrize(
    "answer, expected",
    [("B", "B"), ("(b)", "B"), ("B. blue", "B"), ("C) green", "C"), ("option D", "D"), ("Blue", "B"), (r"\text{A}", "A"), ("purple", None)],
)
def test_extract_choice(answer, expected):
    assert extract_choice(answer, {"A": "red", "B": "blue", "C": "green", "D": "cyan"}) == expected


# ---------------------------------------------------------------------------------------------
# Verifiers through the grader


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\frac{\sqrt 3}{2}}", r"\frac{\sqrt{3}}{2}", True),
        (r"\boxed{\{2, 1\}}", r"\{1,2\}", True),
        (r"\boxed{x=2}", "2", True),
        (r"\boxed{2}", "x=2", True),
        (r"\boxed{1000}", "1,000", True),
        (r"\boxed{3.0}", "3", True),
        (r"Answer: 50\%", "50", True),  # math-verify's convention for a percent: 50\% is 50 ...
        (r"\boxed{0.5}", r"50\%", True),  # ... and 0.5 (a LaTeX percent is read as the percent it is)
        (r"\boxed{5}", r"50\%", False),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
        (r"\boxed{3}", "4", False),
        (r"\boxed{\text{banana}}", "7", False),
        ("no final answer at all, 7", "7", False),
    ],
)
def test_math(grader, response, gold, correct):
    result = grader.grade("math", response, gold)
    assert (result.correct, result.reward, result.failure) == (correct, float(correct), None)


def test_math_timeout_is_a_counted_logged_failure(pool, caplog):
    stats = GraderStats()
    slow = Grader(timeout_s=0.05, stats=stats, pool=pool)
    with caplog.at_level(logging.WARNING, logger="axpo_rllm.envs.verifiers"):
        started = time.perf_counter()
        result = slow.grade("math", r"\boxed{(x-1)(x^{999999}+1)}", r"x^{1000000}-1")
    assert time.perf_counter() - started < 5
    assert result.reward == 0.0 and not result.correct and result.failure.startswith("timeout")
    assert stats.snapshot() == {"calls": 1, "failures": 1, "failures_by_kind": {"timeout": 1}, "failures_by_source": {"math": 1}}
    assert "grader failure" in caplog.text and "timeout" in caplog.text
    # The killed worker is replaced: grading goes on.
    assert Grader(timeout_s=20, stats=stats, pool=pool).grade("math", r"\boxed{2}", "2").correct


def test_unparseable_gold_is_a_failure_not_a_wrong_answer(grader):
    result = grader.grade("math", r"\boxed{5}", "")
    assert result.failure is not None and "could not be parsed" in result.failure
    assert grader.stats.failures == 1


def test_unknown_data_source_is_a_failure(grader):
    result = grader.grade("astrology", "x", "y")
    assert result.reward == 0.0 and "no verifier for data_source 'astrology'" in result.failure
    assert grader.stats.snapshot()["failures_by_source"] == {"astrology": 1}


def test_crashing_verifier_is_a_failure(grader, monkeypatch):
    def broken(response, answer, metadata):
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(V.VERIFIERS, "broken", V.VerifierSpec(broken))
    result = grader.grade("broken", r"\boxed{1}", "1")
    assert result.failure == "crash: ZeroDivisionError: bug" and grader.stats.failures == 1


CHOICES = {"choices": ["red", "blue", "green"]}


@pytest.mark.parametrize(
    "response, gold, metadata, correct",
    [
        (r"\boxed{B}", "B", CHOICES, True),
        ("The answer is (B).", "B", CHOICES, True),
        ("Answer: B. blue", "B", CHOICES, True),
        (r"\boxed{blue}", "B", CHOICES, True),
        (r"\boxed{B}", "blue", CHOICES, True),
        (r"\boxed{C}", "B", CHOICES, False),
        (r"\boxed{purple}", "B", CHOICES, False),
        (r"\boxed{b}", "(B)", {"choices": {"A": "x", "B": "y"}}, True),
    ],
)
def test_choice(grader, response, gold, metadata, correct):
    result = grader.grade("multiple_choice", response, gold, metadata)
    assert (result.correct, result.failure) == (correct, None)


def test_choice_gold_outside_options_is_a_failure(grader):
    assert grader.grade("choice", r"\boxed{A}", "magenta", CHOICES).failure.startswith("crash: ValueError")


@pytest.mark.parametrize(
    "response, gold, metadata, correct",
    [
        (r"\boxed{1,234.5}", "1234.5", {}, True),
        (r"\boxed{3/4}", "0.75", {}, True),
        (r"\boxed{0.7500001}", "0.75", {}, True),
        (r"\boxed{0.76}", "0.75", {}, False),
        (r"\boxed{0.76}", "0.75", {"rel_tol": 0.05}, True),
        (r"\boxed{10.4}", "10", {"abs_tol": 0.5}, True),
        (r"\boxed{50\%}", "0.5", {}, True),
        (r"\boxed{50}", "50%", {}, True),
        (r"\boxed{-2}", "2", {}, False),
        (r"\boxed{about 12 cm}", "12", {}, True),
        (r"\boxed{twelve}", "12", {}, False),
    ],
)
def test_numeric(grader, response, gold, metadata, correct):
    result = grader.grade("numeric", response, gold, metadata)
    assert (result.correct, result.failure) == (correct, None)


def test_chartqa_alias_and_gold_without_number(grader):
    assert get_verifier("ChartQA").fn is V.verify_numeric
    assert grader.grade("numeric", r"\boxed{1}", "n/a").failure.startswith("crash: ValueError")


@pytest.mark.parametrize(
    "response, gold, metadata, reward, correct",
    [
        (r"\boxed{The Belmorin.}", "Belmorin", {}, 1.0, True),
        ("<answer>belmorin</answer>", "Belmorin", {}, 1.0, True),
        (r"\boxed{Kosta}", "Belmorin", {"aliases": ["Kosta"]}, 1.0, True),
        (r"\boxed{Kosta}", '["Belmorin", "Kosta"]', {}, 1.0, True),
        (r"\boxed{Belmorin river}", "Belmorin", {}, 0.0, False),
        (r"\boxed{Belmorin river}", "Belmorin", {"reward": "f1"}, pytest.approx(2 / 3), False),
    ],
)
def test_search_qa(grader, response, gold, metadata, reward, correct):
    result = grader.grade("hotpotqa", response, gold, metadata)
    assert (result.reward, result.correct, result.failure) == (reward, correct, None)


def test_registry_lookups():
    assert get_verifier("hiyouga/geometry3k").isolated
    assert get_verifier("some-org/GSM8K").fn is V.verify_math
    with pytest.raises(KeyError, match="'poetry'"):
        get_verifier("poetry")


# ---------------------------------------------------------------------------------------------
# Concurrency and the worker pool


def test_stats_are_thread_safe():
    stats = GraderStats()

    def hammer():
        for i in range(500):
            stats.record("math", "timeout: x" if i % 5 == 0 else None)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.calls == 4000 and stats.failures == 800


def test_math_grading_from_many_threads(grader):
    """The failure mode of signal.alarm graders: threads. Here every verdict must be right."""
    results = []

    def grade(i):
        results.append(grader.grade("math", rf"\boxed{{\frac{{{2 * i}}}{{2}}}}", str(i)).correct)

    threads = [threading.Thread(target=grade, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8 and grader.stats.failures == 0


def test_pool_deadline_crash_and_stray_output(pool):
    with pytest.raises(GraderTimeout):
        pool.run(time.sleep, (10,), 0.2)
    with pytest.raises(GraderCrash, match="ValueError"):
        pool.run(int, ("not a number",), 5)
    assert pool.run(print, ("stray output must not corrupt the pipe",), 5) is None
    assert pool.run(divmod, (7, 2), 5) == (3, 1)


def test_pool_rejects_bad_size_and_closed_use():
    with pytest.raises(ValueError, match="got 0"):
        DeadlinePool(size=0)
    closed = DeadlinePool(size=1)
    closed.close()
    with pytest.raises(GraderCrash, match="closed"):
        closed.run(divmod, (1, 1), 1)


def test_pool_survives_unpicklable_jobs_and_dead_workers(pool):
    with pytest.raises(GraderCrash, match="grader worker failed"):
        pool.run(lambda: 1, (), 5)  # cannot be pickled in the parent
    with pytest.raises(GraderCrash, match="grader worker failed"):
        pool.run(os._exit, (3,), 5)  # the worker dies mid-job
    assert pool.run(divmod, (9, 4), 5) == (2, 1)


def test_unpicklable_metadata_is_a_counted_failure(grader):
    result = grader.grade("math", r"\boxed{1}", "1", {"handle": threading.Lock()})
    assert result.failure.startswith("crash: grader worker failed") and grader.stats.failures == 1


def test_verl_compute_score_in_executor_threads():
    """verl's reward loop runs compute_score via run_in_executor (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [
        ("math", r"\boxed{\frac{3}{6}}", "0.5", None),
        ("hotpotqa", r"\boxed{Kosta}", ["Belmorin", "Kosta"], {}),
        ("choice", r"\boxed{B}", "B", {"choices": ["x", "y"]}),
        ("unknown_source", r"\boxed{1}", "1", None),
    ]
    with ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda c: V.compute_score(c[0], c[1], c[2], extra_info=c[3]), cases))
    assert [s["score"] for s in scores] == [1.0, 1.0, 1.0, 0.0]
    assert [s["grader_failure"] for s in scores] == [0.0, 0.0, 0.0, 1.0]
    assert all(set(s) == {"score", "acc", "grader_failure"} for s in scores)


def test_every_answer_kind_and_benchmark_is_graded_by_a_registered_verifier():
    from axpo_rllm.envs.verifiers.registry import ANSWER_KINDS, BENCHMARKS, kind_of_verifier

    assert set(BENCHMARKS.values()) <= set(ANSWER_KINDS)
    assert {kind: get_verifier(name).fn for kind, name in ANSWER_KINDS.items()}["f1"] is V.verify_search_qa
    kinds = [kind_of_verifier(get_verifier(s)) for s in ("gsm8k", "mcq", "chartqa", "nq")]
    assert kinds == ["math", "choice", "numeric", "em"]

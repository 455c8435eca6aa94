"""Final answers as untrusted text (issue 10): graded without a marker from the text after
``</think>``, in the forms users write, and never a false positive from part of a token.

Cases are our own, modelled on what peers test and users report: Math-Verify's extraction and
percent conventions, lm-eval-harness' flexible number extraction and multiple-choice filter,
VLMEvalKit's option matching (a letter must stand alone; "A" may be the article), SQuAD's
normalisation.
"""

from __future__ import annotations

import logging
import string
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axpo_rllm.envs.verifiers import (
    DeadlinePool,
    Grader,
    GraderStats,
    extract_choice,
    extract_final_answer,
    final_answer_text,
    normalize_text,
    parse_number,
    token_f1,
)

THINK = "<think>Let me work it out: maybe 3, maybe \\boxed{9}.</think>"


@pytest.fixture(scope="module")
def pool():
    pool = DeadlinePool(size=1)
    yield pool
    pool.close()


@pytest.fixture
def grader(pool):
    return Grader(timeout_s=20.0, stats=GraderStats(), pool=pool)


def verdict(grader, source, response, gold, metadata=None):
    result = grader.grade(source, response, gold, metadata or {})
    assert result.failure is None, result.failure
    assert result.reward == float(result.correct) or source == "search_qa"
    return result.correct


def test_final_answer_text_is_what_follows_the_last_think():
    assert final_answer_text("<think>a</think> b <think>c</think>  42 \n") == ("42", True)
    assert final_answer_text("  42 ") == ("42", False)
    long = "<think>x</think>" + "word " * 5000 + "final 7"
    text, after = final_answer_text(long)
    assert after and text.endswith("final 7") and len(text) <= 4000 and text.startswith("word")
    assert extract_final_answer(THINK + "The result is 42") is None  # markers only; verifiers read the text


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18.\n#### 18", "18"),  # GSM8K's answer line
        ("#### 1,234", "1,234"),
        ("so x #### 5", None),  # not at a line start
        ("**Final Answer**: 42", "42"),
        ("Final Answer: The final answer is $7$. I hope it is correct.", "$7$. I hope it is correct"),  # Minerva's
    ],
)
def test_more_answer_markers(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize("source, gold", [("gsm8k", "18"), ("numeric", "18")])
def test_gsm8k_and_minerva_styles_are_graded(grader, source, gold):
    assert verdict(grader, source, "She makes 9 * 2 = $18 every day.\n#### 18", gold)
    assert verdict(grader, source, "Final Answer: The final answer is $18$. I hope it is correct.", gold)
    assert not verdict(grader, source, "She makes 9 * 2 = $18 every day.\n#### 19", gold)


# ---------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "final, gold, correct",
    [
        ("The result is 42.", "42", True),
        ("So she makes $18 every day.", "18", True),  # currency: math-verify's own expression rule
        ("So she makes \\$18 every day.", "18", True),
        ("It costs €3 in all.", "3", True),
        ("The area is $\\frac{1}{2}$ of the square.", "0.5", True),
        ("The answer would be 42 apples", "42", True),  # math-verify's "answer" anchor
        ("That is 1,234.5 in total", "1234.5", True),
        ("That is 1.2e3 metres", "1200", True),
        ("That is 1.2 \\times 10^3 metres", "1200", True),
        ("x = 2", "2", True),
        ("The roots are $x = 1$ and $x = 2$", "\\{1, 2\\}", True),
        ("The point is (2, 3).", "(2,3)", True),
        ("So the result is 2^{10}", "1024", True),
        ("**12**", "12", True),
        ("We get 12cm.", "12", True),
        # never a false positive from part of a token
        ("So the result is 2^{10}", "2", False),
        ("We use version 7.5.3 of it", "7.5", False),
        ("The value is 123.", "12", False),
        ("The code a3b is printed", "3", False),
        ("Version v5 is out", "5", False),
        ("So it is 2x", "2", False),
        ("On 2019-05-07 it rained", "7", False),
        ("I am not sure.", "7", False),
        ("", "7", False),
    ],
)
def test_math_without_a_marker_reads_the_final_answer_text(grader, final, gold, correct):
    assert verdict(grader, "math", THINK + final, gold) is correct


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("42", "42", True),
        ("$\\frac{1}{2}$", "0.5", True),
        ("\\(x = 2\\)", "2", True),
        ("12 cm", "12", True),
        ("-7.", "-7", True),
        # no </think> and no marker: prose commits to nothing
        ("I think it is 5", "5", False),
        ("no final answer at all, 7", "7", False),
        ("<think>it is 5, surely", "5", False),  # thinking never finished
    ],
)
def test_math_without_think_or_marker_needs_a_bare_answer(grader, response, gold, correct):
    assert verdict(grader, "math", response, gold) is correct


@pytest.mark.parametrize(
    "marked, gold, correct",
    [(r"\boxed{1.2e3}", "1200", True), (r"\boxed{€3}", "3", True), (r"\boxed{2^{10}}", "2", False), (r"\boxed{7.5.3}", "7.5", False)],
)
def test_marked_math_answers_with_plain_spellings(grader, marked, gold, correct):
    assert verdict(grader, "math", marked, gold) is correct


def test_unmarked_math_runs_in_the_killable_worker(pool):
    stats = GraderStats()
    slow = Grader(timeout_s=0.05, stats=stats, pool=pool)
    result = slow.grade("math", THINK + "So it is $(x-1)(x^{999999}+1)$", r"x^{1000000}-1")
    assert result.failure.startswith("timeout") and stats.snapshot()["failures_by_kind"] == {"timeout": 1}


# ----------------------------------------------------------------------------------- multiple choice

THREE = {"choices": ["red", "blue", "green"]}


@pytest.mark.parametrize(
    "response",
    ["B", "(B)", "B.", "**B**", "b", "(b)", "[B]", "blue", "Blue.", "B) blue", "B. blue", "The answer is B", "Answer: (B)",
     THINK + "B", THINK + "b", THINK + "**B**", THINK + "The answer is (B) because the sky is like that.",
     THINK + "I choose B.", THINK + "B is correct.", THINK + "Because the sky looks that way, it must be B",
     THINK + "A cat hides on the left, so B", THINK + "I think the colour is blue.", THINK + "the answer is b."],
)
def test_choice_forms_name_option_b(grader, response):
    assert verdict(grader, "choice", response, "B", THREE)


@pytest.mark.parametrize(
    "response",
    ["Because it is red", "I think B", THINK + "Because of the light.", THINK + "A or B", THINK + "It is either (A) or (C).",
     THINK + "The colour is blue, not red.", THINK + "the answer is a dog", THINK + "Bb", THINK + "", "<think>B"],
)
def test_no_option_is_guessed_from_words_or_ambiguity(grader, response):
    result = grader.grade("choice", response, "B", THREE)
    assert not result.correct and result.failure is None
    # ... and nothing else was read either: no option letter at all
    assert result.extracted in (None, "") or extract_choice(result.extracted, {"A": "red", "B": "blue", "C": "green"}) != "B"


TWELVE = [f"shape {word}" for word in "circle square star moon cross heart ring arrow drop leaf bolt wave".split()]


@pytest.mark.parametrize(
    "metadata",
    [
        {"choices": TWELVE},
        {"options": TWELVE},
        {"choices": dict(zip(string.ascii_uppercase, TWELVE))},
        {"choices": {f"({k.lower()})": v for k, v in zip(string.ascii_uppercase, TWELVE)}},
        {"options": "\n".join(f"{k}. {v}" for k, v in zip(string.ascii_uppercase, TWELVE))},
        {"options": " ".join(f"({k}) {v}" for k, v in zip(string.ascii_uppercase, TWELVE))},
        {"options": str(TWELVE)},  # a Python-literal list in a string (as some datasets store it)
        {"choices": [f"{k}. {v}" for k, v in zip(string.ascii_uppercase, TWELVE)]},  # labels in the list
    ],
    ids=["list", "options-key", "dict", "dict-lower-paren", "lines", "inline", "literal", "labelled-list"],
)
def test_options_beyond_e_from_metadata_in_any_shape(grader, metadata):
    for response, gold in [(r"\boxed{K}", "K"), (THINK + "The answer is (J).", "J"), (THINK + "I think I", "I"),
                           ("shape bolt", "K"), (THINK + "It is the shape wave.", "L"), ("k", "K")]:
        assert verdict(grader, "choice", response, gold, metadata), (response, gold)
        assert not verdict(grader, "choice", response, "A", metadata), (response, "A")


def test_a_letter_outside_the_options_is_not_an_option(grader):
    two = {"choices": ["x", "y"]}
    assert verdict(grader, "choice", r"\boxed{y}", "B", two)  # the option's text, not letter Y
    assert not verdict(grader, "choice", THINK + "C", "A", two)


letters = st.integers(min_value=2, max_value=16).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=0, max_value=n - 1), st.integers(min_value=0, max_value=n - 1))
)
templates = st.sampled_from(["{L}", "({L})", "{L}.", "**{L}**", "{l}", "[{L}]", "{L}) {text}", "The answer is {L}.", "Answer: {L}",
                             THINK + "{L}", THINK + "So the answer is ({L}).", THINK + "I choose {L}.", THINK + "{text}",
                             "\\boxed{{L}}", "<answer>{L}</answer>", THINK + "Looking again, option {L} fits best."])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(picked=letters, template=templates)
def test_any_option_in_any_form(picked, template):
    grader = Grader(stats=GraderStats())
    n, gold, other = picked
    options = [f"thing number {i} " + "xyz"[i % 3] * (i + 1) for i in range(n)]
    letter = string.ascii_uppercase[gold]
    response = template.replace("{L}", letter).replace("{l}", letter.lower()).replace("{text}", options[gold])
    assert grader.grade("choice", response, letter, {"choices": options}).correct, response
    if other != gold:
        assert not grader.grade("choice", response, string.ascii_uppercase[other], {"choices": options}).correct, response


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(word=st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), letter=st.sampled_from("BCDEFGH"))
def test_a_letter_inside_a_word_is_never_an_option(word, letter):
    grader = Grader(stats=GraderStats())
    for glued in (letter + word.lower(), word + letter, letter + "'" + word.lower()):
        response = THINK + f"It is {glued} today."
        assert not grader.grade("choice", response, letter, {"choices": list("12345678")}).correct, response


# ----------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "response, gold, metadata, correct",
    [
        ("1,234.5", "1234.5", {}, True),
        (THINK + "The total is 1,234,567 people", "1234567", {}, True),
        (THINK + "It is 12 cm long.", "12", {}, True),
        (THINK + "It is 12cm long.", "12", {}, True),
        (THINK + "It costs $5.", "5", {}, True),
        (THINK + "It costs €3.50", "3.5", {}, True),
        ("5 dollars", "5", {}, True),
        ("$5", "5", {}, True),
        ("1.2e3", "1200", {}, True),
        ("1.2 \\times 10^3", "1200", {}, True),
        ("1.2 × 10^{3}", "1200", {}, True),
        ("3.5E-2", "0.035", {}, True),
        (THINK + "2^{10}", "1024", {}, True),
        # percent (math-verify's convention): X% is X and X/100; two percents compare as numbers
        ("50%", "0.5", {}, True),
        ("50%", "50", {}, True),
        ("0.5", "50%", {}, True),
        ("50 percent", "0.5", {}, True),
        (r"12.5\%", "0.125", {}, True),
        ("50%", "0.5%", {}, False),
        ("0.5%", "50%", {}, False),
        # tolerances
        (THINK + "roughly 0.76", "0.75", {"rel_tol": 0.05}, True),
        (THINK + "roughly 0.80", "0.75", {"rel_tol": 0.05}, False),
        (THINK + "around 10.4", "10", {"abs_tol": 0.5}, True),
        (THINK + "around 10.6", "10", {"abs_tol": 0.5}, False),
        # the last number of the final answer text is the answer
        (THINK + "3 boxes of 4 make 12", "12", {}, True),
        # never part of a token
        (THINK + "version 7.5.3", "7.5", {}, False),
        (THINK + "2^{10}", "2", {}, False),
        (THINK + "code a3b", "3", {}, False),
        (THINK + "see item 12abc", "12", {}, False),
        (THINK + "the 3rd one", "3", {}, False),
        (THINK + "on 2019-05-07", "7", {}, False),
        ("123", "12", {}, False),
        ("12", "123", {}, False),
        ("-5", "5", {}, False),
        ("no final answer, 7", "7", {}, False),
    ],
)
def test_numeric_forms(grader, response, gold, metadata, correct):
    assert verdict(grader, "numeric", response, gold, metadata) is correct


def thousands(n: int) -> str:
    return f"{n:,}"


CURRENCY = ["", "$", "€", "£", "\\$"]
UNITS = ["", " cm", "cm", " kg", " dollars", " people", "%"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(whole=st.integers(min_value=0, max_value=10**12), cents=st.integers(min_value=0, max_value=99),
       negative=st.booleans(), currency=st.sampled_from(CURRENCY), unit=st.sampled_from(UNITS),
       decimal=st.booleans(), sentence=st.sampled_from(["{x}", "The total is {x}.", "So we get {x}, as computed", "**{x}**"]))
def test_any_number_with_separators_currency_and_units(whole, cents, negative, currency, unit, decimal, sentence):
    value = Decimal(whole) + (Decimal(cents) / 100 if decimal else 0)
    written = ("-" if negative else "") + currency + thousands(whole) + (f".{cents:02d}" if decimal else "") + unit
    value = -value if negative else value
    percent = "%" if unit == "%" else ""
    assert parse_number(written) == (float(value), bool(percent))
    grader, exact = Grader(stats=GraderStats()), {"rel_tol": 0.0, "abs_tol": 0.0}
    response = THINK + sentence.replace("{x}", written)
    assert grader.grade("numeric", response, f"{value}{percent}", exact).correct, response
    for wrong in (value + 1, value * 10 + 1, value + Decimal("0.01")):
        assert not grader.grade("numeric", response, f"{wrong}{percent}", exact).correct, (response, wrong)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(min_value=1, max_value=10**6), glue=st.sampled_from(["a{n}b", "x{n}", "{n}abc", "{n}.{n}.{n}", "{n}-{n}-{n}",
                                                                         "v{n}", "{n}:{n}", "{n}/{n}/{n}", "#{n}#", "{n}_{n}"]))
def test_a_number_inside_a_longer_token_is_not_that_number(n, glue):
    token = glue.format(n=n)
    assert parse_number(token) is None, token
    grader = Grader(stats=GraderStats())
    assert not grader.grade("numeric", THINK + f"It says {token} there.", str(n)).correct, token


def test_a_number_with_more_digits_is_another_number(grader):
    for written, gold in [("123", "12"), ("1200", "120"), ("0.55", "0.5"), ("10", "1")]:
        assert not verdict(grader, "numeric", THINK + f"It is {written}.", gold), written
        assert not verdict(grader, "math", THINK + f"It is {written}.", gold), written


# ------------------------------------------------------------------------------------ EM and F1


@pytest.mark.parametrize(
    "prediction, gold, equal",
    [
        ("The Eiffel Tower", "eiffel tower", True),
        ("  an   apple!", "Apple", True),
        ("“Paris”", "paris", True),
        ("Paris, France.", "paris france", True),
        ("The Beatles", "Beatles, the", True),
        ("Paris", "Parisian", False),
        ("theater", "ater", False),  # an article inside a word stays
    ],
)
def test_squad_normalisation(prediction, gold, equal):
    assert (normalize_text(prediction) == normalize_text(gold)) is equal


def test_qa_without_a_marker_grades_the_final_answer_text(grader):
    assert verdict(grader, "search_qa", THINK + "The Belmorin.", "Belmorin")
    assert verdict(grader, "search_qa", "belmorin", "Belmorin")
    assert not verdict(grader, "search_qa", THINK + "It is Belmorin, I think", "Belmorin")
    f1 = grader.grade("hotpotqa", THINK + "the Belmorin river", "Belmorin", {"reward": "f1"})
    assert f1.reward == pytest.approx(token_f1("Belmorin river", "Belmorin")) == pytest.approx(2 / 3)


def test_grading_stays_quiet_and_counted(grader, caplog):
    with caplog.at_level(logging.WARNING, logger="axpo_rllm.envs.verifiers"):
        for source, response, gold in [("math", THINK + "It is 4", "4"), ("choice", THINK + "B", "B"), ("numeric", THINK + "4", "4")]:
            assert grader.grade(source, response, gold, THREE if source == "choice" else {}).correct
    assert grader.stats.snapshot()["failures"] == 0 and "grader failure" not in caplog.text


@pytest.mark.parametrize("source", ["choice", "numeric"])
def test_hostile_responses_cost_little_in_the_trainer_process(source):
    # choice and numeric grade in-process (no killable worker): nothing quadratic in the response.
    import time

    grader = Grader(stats=GraderStats())
    for response in [THINK + "(B) " * 250_000, "\\boxed{" + "(" * 100_000 + "1" + ")" * 100_000 + "}", "Answer: " + "answer is " * 100_000,
                     THINK + "1,2" * 300_000, THINK + "$" * 500_000]:
        start = time.perf_counter()
        result = grader.grade(source, response, "B" if source == "choice" else "1", THREE if source == "choice" else {})
        assert result.failure is None and time.perf_counter() - start < 3.0, response[:40]


def test_numbers_in_brackets_and_dollars(grader):
    for written in ["(12).", "(**12**)", "$12$", "[12]"]:
        assert parse_number(written) == (12.0, False), written
        assert verdict(grader, "numeric", THINK + f"It is {written}", "12"), written



# ---------------------------------------------------------------------------------------------
# Percent golds, matrices, markdown emphasis, short answers with a unit: general behaviours, each
# with the false positives it must not create.


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        # a percent gold accepts the fraction, however the percent is written (math-verify's convention)
        (r"\boxed{0.5}", r"50\%", True),
        (r"\boxed{\frac{1}{2}}", r"50\%", True),
        (r"\boxed{0.125}", r"12.5\%", True),
        (THINK + "So the share is 0.5.", r"50\%", True),
        (r"\boxed{50}", r"50\%", True),
        # ... and the reverse, as for a plain percent
        (r"\boxed{50\%}", "0.5", True),
        (THINK + r"The share is $50\%$.", "0.5", True),
        # not a false positive: another number, two percents, a gold that is no percent
        (r"\boxed{5}", r"50\%", False),
        (r"\boxed{0.05}", r"50\%", False),
        (r"\boxed{0.5\%}", r"50\%", False),
        (r"\boxed{50\%}", r"0.5\%", False),
        (r"\boxed{0.5}", "50", False),
    ],
)
def test_math_percent_gold_accepts_the_fraction(grader, response, gold, correct):
    assert verdict(grader, "math", response, gold) is correct


PMATRIX = r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        (r"\boxed{\begin{Bmatrix}1&2\\3&4\end{Bmatrix}}", PMATRIX, True),
        (r"\boxed{\begin{smallmatrix}1&2\\3&4\end{smallmatrix}}", PMATRIX, True),
        (r"\boxed{\begin{bmatrix*}[r]1&2\\3&4\end{bmatrix*}}", PMATRIX, True),
        (r"\boxed{" + PMATRIX + "}", r"\begin{Bmatrix}1&2\\3&4\end{Bmatrix}", True),
        (THINK + r"The matrix is $\begin{smallmatrix}1&2\\3&4\end{smallmatrix}$.", PMATRIX, True),
        # by value: other entries, another shape, a determinant are not the matrix
        (r"\boxed{\begin{Bmatrix}1&2\\3&5\end{Bmatrix}}", PMATRIX, False),
        (r"\boxed{\begin{smallmatrix}1&3\\2&4\end{smallmatrix}}", PMATRIX, False),
        (r"\boxed{\begin{bmatrix*}1&2\end{bmatrix*}}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
        (r"\boxed{\begin{vmatrix}1&2\\3&4\end{vmatrix}}", PMATRIX, False),
    ],
)
def test_math_matrices_compare_by_value_whatever_the_environment(grader, response, gold, correct):
    assert verdict(grader, "math", response, gold) is correct


@pytest.mark.parametrize(
    "source, response, gold, correct",
    [
        ("math", "*42*", "42", True),
        ("math", "Answer: *42*", "42", True),
        ("math", "_42_", "42", True),
        ("math", "***42***", "42", True),
        ("numeric", "__42__", "42", True),
        ("numeric", "_42_.", "42", True),
        ("numeric", "Answer: *42*", "42", True),
        ("choice", "_C_", "C", True),
        ("choice", "Answer: *C*", "C", True),
        ("choice", "**C**", "C", True),
        # emphasis is not part of the answer, and it makes no wrong answer right
        ("math", "*41*", "42", False),
        ("numeric", "_41_", "42", False),
        ("numeric", "*4*2", "42", False),
        ("math", "**not** 42", "42", False),
        ("choice", "*C*", "B", False),
    ],
)
def test_an_answer_in_markdown_emphasis_is_read(grader, source, response, gold, correct):
    metadata = {"choices": ["red", "blue", "green"]} if source == "choice" else {}
    assert verdict(grader, source, response, gold, metadata) is correct


@pytest.mark.parametrize("source", ["math", "numeric"])
@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("It is 12 cm long.", "12", True),
        ("about 12 cm", "12", True),
        ("The length is 12cm", "12", True),
        ("It costs $5.", "5", True),
        ("Answer: It is 12 cm long.", "12", True),
        ("The share is 50%.", "0.5", True),
        # the number must be the answer: another number, no unit, hedged, two numbers, long prose
        ("It is 13 cm long.", "12", False),
        ("I think it is 12", "12", False),
        ("It is not 12 cm.", "12", False),
        ("It isn't 12 cm.", "12", False),
        ("more than 12 cm", "12", False),
        ("up to 12 cm", "12", False),
        ("between 10 and 12 cm", "12", False),
        ("12 cm or 15 cm", "12", False),
        ("After measuring all of it twice we find it is 12 cm", "12", False),
    ],
)
def test_a_short_answer_with_a_unit_is_graded_on_its_number(grader, source, response, gold, correct):
    assert verdict(grader, source, response, gold) is correct


def test_a_short_answer_with_a_unit_needs_a_numeric_gold(grader):
    assert verdict(grader, "math", "It is 12 cm long.", "12") is True
    assert verdict(grader, "math", "It is 12 cm long.", "x + 1") is False

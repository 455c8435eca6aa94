"""The verifier of each answer kind: ``(response, answer, metadata) -> VerifyResult``. Pure;
failures are the :class:`~.grader.Grader`'s job."""

from __future__ import annotations

import json
from typing import Mapping

from .answers import MAX_FINAL_TEXT_CHARS, extract_final_answer, final_answer_text, normalize_text, token_f1
from .choices import bare_choice, choice_texts, extract_choice, find_choice
from .math_answers import bare_math, math_answer, math_verify_equal, math_verify_find
from .numbers import bare_number, number_tokens, numbers_match, numeric_gold, parse_number, short_quantity
from .results import VerifyResult


def verify_math(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Symbolic equivalence of the final answer and the gold answer (math-verify). A numeric gold
    also accepts a short answer whose one number has a unit ("It is 12 cm long."; :func:`short_quantity`)."""
    marked = extract_final_answer(response)
    if marked is None:
        text, after_think = final_answer_text(response)
        if after_think:
            correct, extracted = math_verify_find(answer, text) if text else (False, None)
            return VerifyResult(float(correct), correct, extracted)
        marked = bare_math(text)
        if marked is None:
            correct = _quantity_matches(text, answer)
            return VerifyResult(float(correct), correct, text if correct else None)
    correct = math_verify_equal(answer, math_answer(marked)) or _quantity_matches(marked, answer)
    return VerifyResult(float(correct), correct, marked)


def _quantity_matches(text: str, answer: str) -> bool:
    """A numeric gold against a short answer's one number with a unit (1e-6 relative, percent as
    :func:`numbers_match`)."""
    gold = numeric_gold(answer)
    pred = short_quantity(text) if gold is not None else None
    return pred is not None and numbers_match(pred, gold, 1e-6, 1e-9)


def verify_choice(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Multiple choice: the answer may be given as a letter or as the option's text."""
    choices = choice_texts(metadata)
    gold = extract_choice(answer, choices)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} names no option of {sorted(choices) or 'A-Z'}")
    marked = extract_final_answer(response)
    if marked is not None:
        extracted, letter = marked, extract_choice(marked[:MAX_FINAL_TEXT_CHARS], choices)
    else:
        text, after_think = final_answer_text(response)
        letter = bare_choice(text, choices) or (find_choice(text, choices) if after_think else None)
        extracted = letter
    correct = letter is not None and letter == gold
    return VerifyResult(float(correct), correct, extracted)


def verify_numeric(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """|pred - gold| <= max(abs_tol, rel_tol * |gold|); ``metadata`` may set ``rel_tol``/``abs_tol``.

    Defaults are near-exact (rel 1e-6); datasets with "relaxed accuracy" (ChartQA: 5%) set their own.
    A marked answer is read for its first number ("about 12 cm"), an unmarked text after ``</think>``
    for its last one (the usual place of a result), a response without either must be a bare number.
    Percent: see :func:`numbers_match`.
    """
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} holds no number")
    marked = extract_final_answer(response)
    if marked is not None:
        extracted, pred = marked, parse_number(marked[:MAX_FINAL_TEXT_CHARS])
    else:
        text, after_think = final_answer_text(response)
        pred, extracted = bare_number(text), text
        if pred is None and after_think:
            found = number_tokens(text)
            pred, extracted = ((found[-1][0], found[-1][1]), found[-1][2]) if found else (None, None)
        elif pred is None:
            pred = short_quantity(text)  # "It is 12 cm long."
    if pred is None:
        return VerifyResult(0.0, False, extracted)
    rel_tol = float(metadata.get("rel_tol", 1e-6))
    abs_tol = float(metadata.get("abs_tol", metadata.get("tolerance", 1e-9)))
    correct = numbers_match(pred, gold, rel_tol, abs_tol)
    return VerifyResult(float(correct), correct, extracted)


def _gold_aliases(answer: str, metadata: Mapping) -> list[str]:
    """The gold answer plus ``metadata["aliases"]``; a JSON list in ``answer`` counts as aliases too."""
    aliases: list[str] = []
    stripped = answer.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
            if isinstance(parsed, list):
                aliases.extend(str(a) for a in parsed)
        except json.JSONDecodeError:
            pass
    if not aliases:
        aliases.append(answer)
    aliases.extend(str(a) for a in metadata.get("aliases", ()))
    return aliases


def verify_search_qa(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Normalised exact match against any alias; ``metadata["reward"] == "f1"`` credits token F1 instead.

    Without a marked answer, the final answer text (after ``</think>``, or the whole response) is
    the answer: exact match on normalised text cannot be fooled by prose around a right word.
    """
    extracted = extract_final_answer(response)
    if extracted is None:
        extracted = final_answer_text(response)[0] or None
    if extracted is None:
        return VerifyResult(0.0, False, None)
    aliases = _gold_aliases(answer, metadata)
    exact = any(normalize_text(extracted) == normalize_text(a) for a in aliases)
    if metadata.get("reward", "em") == "f1":
        return VerifyResult(max(token_f1(extracted, a) for a in aliases), exact, extracted)
    return VerifyResult(float(exact), exact, extracted)

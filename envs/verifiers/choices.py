"""Multiple-choice answers: the options of a task and the option an answer names."""

from __future__ import annotations

import ast
import json
import re
import string
from typing import Any, Mapping

from .answers import clean_answer, normalize_text

# Multiple choice
#
# Options come from the task metadata (``choices`` or ``options``: a list, a dict keyed by letter,
# or a string "A. red\nB. blue"), any number of them (letters beyond E included). An answer names an
# option by letter ("B", "(B)", "B.", "**B**", "b", "B) text", "option B", "The answer is B") or by
# the option's own text. In running text a letter counts only as a whole token (never the B of
# "Because"), "A"/"I" only when they are not the English words, and two different options named
# the same way are no answer rather than a guess.

_LETTERS = string.ascii_uppercase
_OPTION_LINE_RE = re.compile(r"(?:^|(?<=\s))[(\[]?([A-Za-z])[)\].:]\s*(.*?)(?=\s+[(\[]?[A-Za-z][)\].:]\s|\s*$)", re.S)


def _option_list(raw: Any) -> list[str] | dict | None:
    """A metadata value as a list or dict of options (a JSON/Python-literal string list included)."""
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            for load in (json.loads, ast.literal_eval):
                try:
                    value = load(text)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                if isinstance(value, (list, tuple)):
                    return [str(v) for v in value]
        options = {m.group(1).upper(): m.group(2).strip() for m in _OPTION_LINE_RE.finditer(text)}
        return options or None
    try:
        return [str(v) for v in raw]  # list, tuple, numpy array
    except TypeError:
        return None


def choice_texts(metadata: Mapping) -> dict[str, str]:
    """``{letter: option text}`` from ``metadata["choices"]`` / ``metadata["options"]``."""
    choices = None
    for key in ("choices", "options"):
        choices = _option_list(metadata.get(key))
        if choices:
            break
    if not choices:
        return {}
    if isinstance(choices, dict):
        out = {}
        for key, value in choices.items():
            letter = re.sub(r"[^A-Za-z]", "", str(key)).upper()
            if len(letter) == 1:
                out[letter] = str(value)
        return out
    out = {}
    for letter, option in zip(_LETTERS, choices):
        # "A. red" in a list labelled by position: the label is not part of the option's text
        labelled = re.match(rf"\s*[(\[]?{letter}[)\].:]\s+(.*)", option, re.S | re.I)
        out[letter] = labelled.group(1) if labelled else option
    return out


def _letters_class(choices: Mapping[str, str] | None) -> str:
    letters = "".join(sorted(k for k in (choices or {}) if len(k) == 1 and k.isalpha())) or _LETTERS
    return "[" + letters + letters.lower() + "]"


def bare_choice(answer: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The option an answer names when the answer is *only* that: ``B``, ``(b)``, ``[B]``, ``B.``,
    ``B) blue``, ``option D``, ``\\text{A}``, or exactly an option's text."""
    text = clean_answer(answer)
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text).strip()
    text = re.sub(r"^\*\*(.*)\*\*$", r"\1", text).strip()
    match = (
        re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:]?", text)
        or re.match(r"[(\[]?([A-Z])[)\].:](?:\s|$)", text)
        or re.fullmatch(r"(?:option|choice)(?:\s*[(\[]|\s+)([A-Za-z])[)\]]?", text, re.IGNORECASE)
    )
    if match is None:  # "Option B: blue"
        match = re.match(r"(?:option|choice)(?:\s*[(\[]|\s+)([A-Z])[)\]]?[.:)]\s", text, re.IGNORECASE)
    if match is not None and (not choices or match.group(1).upper() in choices):
        return match.group(1).upper()
    if choices:  # an option's own text (also "y" when the options are A-B and one of them is "y")
        wanted = normalize_text(text)
        for letter, option in choices.items():
            if wanted and normalize_text(option) == wanted:
                return letter
    return None


def _commitment_patterns(letters: str) -> list[re.Pattern]:
    word_end = r"(?![A-Za-z0-9'’])"
    letter = rf"[(\[]?[*_]*(?P<l>{letters})[*_]*[)\]]?{word_end}"
    return [
        re.compile(
            rf"\b(?:answer|option|choice)\b[*_]*\s*(?:is|would\s+be|should\s+be|will\s+be|=|[:：])?[*_]*\s*"
            rf"(?:(?:option|choice)\b\s*)?[:：]?\s*{letter}",
            re.IGNORECASE,
        ),
        re.compile(rf"\b(?:choose|select|pick|go\s+with|correct\s+one\s+is)\s+(?:(?:option|choice)\s+)?{letter}", re.IGNORECASE),
        re.compile(rf"(?<![A-Za-z0-9]){letter}\s+is\s+(?:the\s+)?(?:correct|right|best|answer)", re.IGNORECASE),
    ]


def _is_word_use(text: str, match: re.Match) -> bool:
    """A lower-case letter followed by a word ("answer is a dog") is the English word, not an option."""
    letter = match.group("l")
    return letter.islower() and re.match(r"\s*[A-Za-z]", text[match.end() :]) is not None


_NOT_AFTER_ARTICLE = frozenset("or and nor vs versus is was seems looks appears would could should might must will".split())


def _is_english_word(following: str) -> bool:
    """Whether a capital "A" or "I" followed by ``following`` reads as the article or the pronoun
    ("A cat ...", "I think ...") rather than as an option ("A or B", "A is ...")."""
    word = re.match(r"\s+([a-z][a-z']*)", following)
    return word is not None and word.group(1) not in _NOT_AFTER_ARTICLE


def find_choice(text: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The option a final answer text names, looked for the way people write it (see the section note)."""
    letters = _letters_class(choices)
    # 1. A commitment ("the answer is (B)", "I choose C", "B is correct"): the last one wins.
    hits = [(m.start(), m.group("l").upper()) for p in _commitment_patterns(letters) for m in p.finditer(text) if not _is_word_use(text, m)]
    if hits:
        return max(hits)[1]
    # 2. A letter written as an option label: "(B)", "[B]", "**B**", "B." / "B)" opening a line.
    labelled = set()
    for m in re.finditer(rf"[(\[]({letters})[)\]]|\*\*({letters})\*\*|(?:^|\n)[ \t]*({letters.upper()})[.):](?=\s|$)", text):
        labelled.add(next(g for g in m.groups() if g).upper())
    if len(labelled) == 1:
        return labelled.pop()
    if len(labelled) > 1:
        return None
    # 3. A capital letter standing alone ("B", "so B."), not the words "A" and "I".
    alone = set()
    for m in re.finditer(rf"(?<![A-Za-z0-9'’_\\-])({letters.upper()})(?![A-Za-z0-9'’_-])", text):
        if m.group(1) in "AI" and _is_english_word(text[m.end() :]):
            continue
        alone.add(m.group(1))
    if len(alone) == 1:
        return alone.pop()
    if len(alone) > 1:
        return None
    # 4. An option's text, as whole words; of options found inside each other, the longest.
    if choices:
        padded = f" {normalize_text(text)} "
        found = {letter: normalize_text(option) for letter, option in choices.items() if normalize_text(option)}
        found = {letter: option for letter, option in found.items() if f" {option} " in padded}
        longest = [letter for letter, option in found.items() if all(other in option for other in found.values())]
        if len(longest) == 1:
            return longest[0]
    return None


def extract_choice(answer: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The option letter an answer names: ``B``, ``(B)``, ``B. red``, ``option B``, an option's text,
    or, in a longer answer, "The answer is (B)" and the other written forms (:func:`find_choice`)."""
    return bare_choice(answer, choices) or find_choice(clean_answer(answer), choices)

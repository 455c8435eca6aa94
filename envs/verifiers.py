"""Answer checking by data source: final-answer extraction, verifiers, and a grader that never zeroes silently.

A task's ``data_source`` picks its verifier from :data:`VERIFIERS` (``math``, ``choice``,
``numeric``, ``search_qa`` and their dataset aliases). :class:`Grader` runs it and turns every
way grading can go wrong (a timeout, a crash, an unparseable gold answer) into reward 0 **plus**
a counted, logged failure in :class:`GraderStats`: a silent zero would look exactly like a wrong
answer and quietly poison the RL signal (users' top complaint: graders zeroing rewards in workers).

Math uses math-verify with its own ``signal.alarm`` timeouts switched off (they raise or score 0
in threads and Ray workers, docs/upstream.md §5); the deadline comes from running the check in a
worker *process* (:class:`DeadlinePool`) that is killed when it overruns, since a thread stuck in
sympy cannot be stopped.

Model output is untrusted text: a final answer is read from a marker (``\\boxed{}``, ``<answer>``,
``Answer:``) or, without one, from the final answer text after ``</think>`` (math through
math-verify's own extraction, the usual multiple-choice forms, the last number, the whole text for
QA), and never from part of a token (see "Final-answer extraction" below). Conventions: a percent
``X%`` matches ``X`` and ``X/100`` (math-verify's, for a percent it recognises; two percents compare
as numbers), in gold and answer alike and however it is written (``50%``, ``50\\%``, ``50 percent``);
numbers take thousands separators, currency, units and scientific notation; a matrix is its values
whatever its environment (``pmatrix``, ``bmatrix``, ``Bmatrix``, ``smallmatrix``, starred forms);
markdown emphasis around an answer (``**C**``, ``*42*``, ``_42_``) is not part of it; a short
answer in a few words of prose whose one number carries a unit ("It is 12 cm long.") is graded on
that number when the gold is a number.
"""

from __future__ import annotations

import ast
import atexit
import importlib
import json
import logging
import math
import os
import pickle
import re
import select
import string
import struct
import subprocess
import sys
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = [
    "VerifyResult",
    "GraderStats",
    "Grader",
    "GraderTimeout",
    "GraderCrash",
    "DeadlinePool",
    "VerifierSpec",
    "VERIFIERS",
    "register_verifier",
    "get_verifier",
    "extract_boxed",
    "extract_final_answer",
    "final_answer_text",
    "extract_choice",
    "parse_number",
    "normalize_text",
    "token_f1",
    "verify_math",
    "verify_choice",
    "verify_numeric",
    "verify_search_qa",
    "GRADER_STATS",
    "compute_score",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on one final answer."""

    reward: float
    """What the rollout is credited with (0 on a grader failure)."""
    correct: bool
    extracted: str | None = None
    """The final answer as read from the response (None: the response gave none)."""
    failure: str | None = None
    """Why grading failed (``timeout: ...``, ``crash: ...``); None when the grader ran to completion."""

    @classmethod
    def failed(cls, failure: str, extracted: str | None = None) -> "VerifyResult":
        return cls(reward=0.0, correct=False, extracted=extracted, failure=failure)


class GraderStats:
    """Thread-safe counters of grading calls and failures (by kind and by data source).

    Exposed so the trainer can log ``grader/failures`` every step: a rising count means rewards are
    being zeroed by the grader, not earned by the policy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._failures: Counter[tuple[str, str]] = Counter()

    def record(self, data_source: str, failure: str | None) -> None:
        with self._lock:
            self._calls[data_source] += 1
            if failure is not None:
                self._failures[(data_source, failure.split(":", 1)[0])] += 1

    @property
    def calls(self) -> int:
        with self._lock:
            return sum(self._calls.values())

    @property
    def failures(self) -> int:
        with self._lock:
            return sum(self._failures.values())

    def snapshot(self) -> dict:
        """``{"calls", "failures", "failures_by_kind", "failures_by_source"}``, for logging."""
        with self._lock:
            by_kind: Counter[str] = Counter()
            by_source: Counter[str] = Counter()
            for (source, kind), n in self._failures.items():
                by_kind[kind] += n
                by_source[source] += n
            return {
                "calls": sum(self._calls.values()),
                "failures": sum(self._failures.values()),
                "failures_by_kind": dict(by_kind),
                "failures_by_source": dict(by_source),
            }

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._failures.clear()


GRADER_STATS = GraderStats()
"""The process-wide counters every :class:`Grader` uses unless given its own."""


# --------------------------------------------------------------------------------------------
# Final-answer extraction
#
# Where the answer is read from, in this order:
#   1. a marker: the last ``\boxed{}``, else ``<answer>...</answer>``, else ``#### 18``, else an ``Answer:`` line
#      (:func:`extract_final_answer`), always after the last ``</think>``;
#   2. no marker, but a ``</think>``: the text after it *is* the final answer text, and each verifier
#      looks for its kind of answer in it (math-verify's own extraction, the usual multiple-choice
#      forms, the last number, the whole text for QA);
#   3. no marker and no ``</think>``: only a response that is nothing but an answer counts ("42",
#      "(B)", "12 cm"); prose that merely contains a number ("no final answer at all, 7") commits to
#      nothing and is graded as no answer.
# Every reading refuses partial tokens: a number inside a longer token ("2^{10}", "7.5.3", "a3b",
# "123" for 12) is not that number, a letter inside a word ("Because") is not choice B.


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``; escaped braces (``\\{``) do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{}``, or ``\\boxed 5``), nested braces kept."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _balanced_group(text, end)
            if content is not None:
                return content.strip()
        else:  # "\boxed 5$": the argument is the next token
            token = re.match(r"[^\s$]+", text[end:])
            if token:
                return token.group(0)
    return None


_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)[*_]*\s*(?:is\s*[:：]?|[:：])[*_]*\s*(.+)",
    re.IGNORECASE,
)
_NESTED_ANSWER_RE = re.compile(r"\s*(?:the\s+)?(?:final\s+)?answer[*_]*\s*(?:is\s*[:：]?|[:：])[*_]*\s*(.+)", re.IGNORECASE)
_HASHES_RE = re.compile(r"(?:^|\n)[ \t]*####[ \t]*(\S[^\n]*)")
"""GSM8K's answer line ("#### 18"), which models trained on it write."""


_EMPHASIS_RE = re.compile(r"(\*{1,3}|_{1,3})(\S(?:.*?\S)?)\1", re.S)
"""Markdown emphasis wrapping a whole text: ``**C**``, ``*42*``, ``__42__``, ``_42_`` (markdown's
rule: no space just inside the markers)."""


def _unwrap_emphasis(text: str) -> str:
    """``text`` without the markdown emphasis wrapping all of it (nested too: ``***42***``)."""
    for _ in range(3):
        match = _EMPHASIS_RE.fullmatch(text)
        if match is None:
            break
        text = match.group(2)
    return text


def _clean_answer(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^\*\*|\*\*$", "", text).strip().rstrip(".").strip()  # markdown bold, full stop
    text = _unwrap_emphasis(text).rstrip(".").strip()  # "*42*", "_42_."
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


def extract_final_answer(response: str) -> str | None:
    """The model's final answer: the last ``\\boxed{}``, else ``<answer>...</answer>``, else a ``#### 18``
    line (GSM8K), else an ``Answer:`` line.

    Only text after the last ``</think>`` counts: a draft answer inside the reasoning is not the
    answer. Returns None when the response commits to no marked answer (the verifiers then read
    the final answer text itself: :func:`final_answer_text`).
    """
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG_RE.findall(response)
    if tags:
        inner = tags[-1]
        return extract_boxed(inner) or _clean_answer(inner) or None
    hashes = _HASHES_RE.findall(response)
    if hashes:
        return _clean_answer(hashes[-1]) or None
    lines = _ANSWER_LINE_RE.findall(response)
    if lines:
        line = lines[-1].splitlines()[0]
        nested = _NESTED_ANSWER_RE.match(line)  # "Final Answer: The final answer is $7$." (Minerva's format)
        return _clean_answer(nested.group(1) if nested else line) or None
    return None


MAX_FINAL_TEXT_CHARS = 4000
"""Unmarked final answers are read from at most this many trailing characters, marked ones (for a
choice or a number) from this many leading ones: a bound on the work a hostile response causes in
the trainer process (an answer is at the end of the text, a marked answer at its start)."""


def final_answer_text(response: str) -> tuple[str, bool]:
    """``(text, after_think)``: the text after the last ``</think>`` (``after_think`` True), else the
    whole response; stripped and cut to its last :data:`MAX_FINAL_TEXT_CHARS` characters at a space."""
    after_think = "</think>" in response
    text = response.rsplit("</think>", 1)[1] if after_think else response
    text = text.strip()
    if len(text) > MAX_FINAL_TEXT_CHARS:
        tail = text[-MAX_FINAL_TEXT_CHARS:]
        cut = re.search(r"\s", tail)
        text = tail[cut.end() :] if cut else tail
    return text, after_think


_PUNCTUATION = frozenset(string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation (ASCII and Unicode), no articles, single spaces."""
    text = text.casefold()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_text(prediction).split(), normalize_text(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if not pred_tokens or not gold_tokens or common == 0:
        return float(pred_tokens == gold_tokens)
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Numbers
#
# A number is a whole token: sign, currency (``$ € £ ¥ ₹``), digits with thousands separators
# (``1,234.5``), a fraction (``3/4``, ``\frac{3}{4}``), scientific notation (``1.2e3``,
# ``1.2 \times 10^3``, ``10^{3}``), a percent sign or the word ``percent``, a unit glued on or
# standing beside it (``12cm``, ``12 cm``). A token with anything else in it ("7.5.3", "a3b",
# "2019-05-07", "3rd", "2x") holds no number at all.

_UNITS = frozenset(
    """
    mm cm dm m km in inch inches ft feet foot yd yard yards mi mile miles nm um µm
    meter meters metre metres centimeter centimeters centimetre centimetres millimeter millimeters
    kilometer kilometers kilometre kilometres
    mg g kg ton tons tonnes lb lbs pound pounds oz ounce ounces gram grams kilogram kilograms
    ms s sec secs second seconds min mins minute minutes h hr hrs hour hours day days week weeks
    month months year years yr yrs
    ml l liter liters litre litres gal gallon gallons cc
    m2 cm2 km2 mm2 ft2 m3 cm3 sqm sq m² cm² km² m³ cm³
    mph kmh kph km/h m/s ft/s rpm hz khz mhz ghz
    kb mb gb tb kw w kwh v mv ma ohm ohms j kj cal kcal
    ° °c °f deg degree degrees rad radian radians
    px pt pts point points times
    usd eur euro euros gbp jpy cny inr dollar dollars cent cents yuan yen rupees
    percent pct per cent
    unit units apple apples people person persons item items
    """.split()
)
"""Words a bare numeric answer may carry beside its number ("12 cm", "5 dollars") or glued to it
("12cm"). Not letters that change the number or name a variable: "5k", "2x", "3a", "1t"."""

_CURRENCY = "$€£¥₹"
_NUMBER_TOKEN_RE = re.compile(
    rf"(?P<sign>[-+]?)[{_CURRENCY}]?(?P<sign2>[-+]?)"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>(?:\d+(?:\.\d+)?|\.\d+)))?"
    r"(?:[eE](?P<exp>[-+]?\d{1,4}))?"
    r"(?:\^(?:\{(?P<pow>[-+]?\d{1,4})\}|(?P<pow2>[-+]?\d{1,4})))?"
    rf"(?P<pct>%)?(?P<unit>[A-Za-zµ°²³/]+)?[{_CURRENCY}]?"
)
_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?(?:\d+(?:\.\d+)?|\.\d+))\s*\}\s*\{\s*(-?(?:\d+(?:\.\d+)?|\.\d+))\s*\}")
_TIMES_TEN_RE = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:\\times|×|\\cdot|·|\*|x)\s*10\s*\^\s*(?:\{\s*([-+]?\d{1,4})\s*\}|([-+]?\d{1,4}))"
)
_TOKEN_SPLIT_RE = re.compile(r"[\s=≈~]+")
_QUOTES = "\"'“‘”’*`"
_CLOSING = {"(": ")", "[": "]", "{": "}"}
_OPENING = {v: k for k, v in _CLOSING.items()}


_DIGIT_GROUP_RE = re.compile(r"(?<=\d)(?:\\,|\\ |~|[\u00a0\u202f\u2009])(?=\d{3}(?!\d))")
"""A thin or non-breaking space between digit groups ("1\\,000", "1 000" with U+202F): one number.
(A plain space is not: "3 100" is as often two numbers as one.)"""


def _latex_to_plain(text: str) -> str:
    """The few LaTeX spellings of numbers, as plain text (``\\frac{3}{4}`` -> ``3/4``, ``\\%`` -> ``%``)."""
    text = _DIGIT_GROUP_RE.sub("", text.replace("−", "-"))
    text = text.replace("\\!", "").replace("\\,", " ").replace("{,}", ",")
    text = text.replace("\\%", "%").replace("\\$", "$").replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}", r" \1 ", text)
    text = _FRAC_RE.sub(lambda m: f" {m.group(1)}{m.group(2)}/{m.group(3)} ", text)
    return _TIMES_TEN_RE.sub(lambda m: f"{m.group(1)}e{m.group(2) or m.group(3)}", text)


def _strip_punctuation(token: str) -> str:
    """Quotes, sentence punctuation and unbalanced brackets off both ends of a token ("(12).", "**5**")."""
    for _ in range(8):  # a few rounds ("(**12**)."); each is linear, so a hostile token costs little
        before = token
        token = _unwrap_emphasis(token.strip(_QUOTES).rstrip(".,;:!?"))
        if token and token[0] in _CLOSING:
            opener = token[0]
            excess = token.count(opener) - token.count(_CLOSING[opener])
            token = token[max(0, min(excess, len(token) - len(token.lstrip(opener)))) :]
        if token and token[-1] in _OPENING:
            closer = token[-1]
            excess = token.count(closer) - token.count(_OPENING[closer])
            token = token[: len(token) - max(0, min(excess, len(token) - len(token.rstrip(closer))))]
        if token == before:
            break
    return token


def _strip_token(token: str) -> str:
    """A token without its punctuation, enclosing brackets or ``$...$`` ("(12).", "$5$", "(**B**)")."""
    token = _strip_punctuation(token)
    for _ in range(4):
        if len(token) > 1 and ((token[0] in _CLOSING and token[-1] == _CLOSING[token[0]]) or token[0] == token[-1] == "$"):
            token = _strip_punctuation(token[1:-1])
        else:
            break
    return token


def _token_value(token: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` when ``token`` (already stripped) is one number, else None."""
    match = _NUMBER_TOKEN_RE.fullmatch(token)
    if match is None or (match.group("sign") and match.group("sign2")):
        return None
    unit = match.group("unit")
    if unit is not None and unit.casefold() not in _UNITS:
        return None  # "12abc", "3rd", "2x": not a number with a unit
    try:
        value = float(match.group("body").replace(",", ""))
        if match.group("den") is not None:
            value /= float(match.group("den"))
        if match.group("exp") is not None:
            value *= 10.0 ** int(match.group("exp"))
        power = match.group("pow") or match.group("pow2")
        if power is not None:
            value **= int(power)
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    if "-" in (match.group("sign") + match.group("sign2")):
        value = -value
    return value, match.group("pct") is not None


def _number_tokens(text: str) -> list[tuple[float, bool, str]]:
    """Every whole-token number in ``text``, in order: ``(value, is_percent, token)``."""
    tokens = [t for t in _TOKEN_SPLIT_RE.split(_latex_to_plain(text)) if t]
    found = []
    for i, raw in enumerate(tokens):
        token = _strip_token(raw)
        parsed = _token_value(token) if token else None
        if parsed is None:
            continue
        value, is_percent = parsed
        following = _strip_token(tokens[i + 1]).casefold() if i + 1 < len(tokens) else ""
        if following in ("percent", "pct", "%") or (following == "per" and i + 2 < len(tokens) and _strip_token(tokens[i + 2]).casefold() == "cent"):
            is_percent = True
        found.append((value, is_percent, token))
    return found


def parse_number(text: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` of the first whole-token number in ``text``; None if there is none.

    Accepts thousands separators (``1,234``), currency symbols, units (``12 cm``, ``12cm``),
    fractions (``3/4``, ``\\frac{3}{4}``), scientific notation (``1.2e3``, ``1.2 \\times 10^3``)
    and a trailing ``%`` / ``\\%`` / ``percent``. A number inside a longer token is no number.
    """
    found = _number_tokens(text)
    return (found[0][0], found[0][1]) if found else None


def _bare_number(text: str) -> tuple[float, bool] | None:
    """The number when ``text`` is nothing but one number and its units ("12 cm", "$5", "50 percent")."""
    found = _number_tokens(text)
    if len(found) != 1:
        return None
    rest = [_strip_token(t).casefold() for t in _TOKEN_SPLIT_RE.split(_latex_to_plain(text)) if _strip_token(t)]
    words = [t for t in rest if t != found[0][2].casefold()]
    return (found[0][0], found[0][1]) if all(w in _UNITS or not re.search(r"\w", w) for w in words) else None


def _numbers_match(pred: tuple[float, bool], gold: tuple[float, bool], rel_tol: float, abs_tol: float) -> bool:
    """Percent convention (math-verify's for a percent it recognises): ``X%`` matches ``X`` and ``X/100``;
    two percents compare as numbers (50% is not 0.5%)."""
    (p, p_pct), (g, g_pct) = pred, gold
    pairs = [(p, g)]
    if p_pct and not g_pct:
        pairs.append((p / 100.0, g))
    elif g_pct and not p_pct:
        pairs.append((p, g / 100.0))
    return any(math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol) for a, b in pairs)


SHORT_ANSWER_WORDS = 8
"""A final answer of at most this many words may be prose around its number ("It is 12 cm long.")."""

_HEDGES = frozenset(
    "not no never neither nor none except without cannot more less fewer greater larger smaller "
    "over under above below least most than exceeds exceed up between".split()
)
"""Words that make a short answer's number something other than the answer ("not 12 cm", "more than
12 cm", "up to 12 cm"): such an answer commits to no number."""


def _short_quantity(text: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` when ``text`` is a short answer (one line, at most
    :data:`SHORT_ANSWER_WORDS` words) holding exactly one number, that number carries a unit
    (``12 cm``, ``12cm``, ``$5``, ``50%``), and no word hedges it ("not", "more than"). A number
    without a unit in prose ("no final answer at all, 7") commits to nothing."""
    text = _clean_answer(text)
    if not text or "\n" in text:
        return None
    words = [w for w in _TOKEN_SPLIT_RE.split(_latex_to_plain(text)) if w]
    plain = [_strip_token(w).casefold() for w in words]
    if len(words) > SHORT_ANSWER_WORDS or any(w in _HEDGES or w.endswith(("n't", "n’t")) for w in plain):
        return None
    found = _number_tokens(text)
    if len(found) != 1:
        return None
    value, is_percent, token = found[0]
    at = plain.index(token.casefold()) if token.casefold() in plain else -1
    following = plain[at + 1] if 0 <= at < len(plain) - 1 else ""
    match = _NUMBER_TOKEN_RE.fullmatch(token)
    has_unit = is_percent or bool(match and match.group("unit")) or any(c in token for c in _CURRENCY) or following in _UNITS
    return (value, is_percent) if has_unit else None


def _numeric_gold(answer: str) -> tuple[float, bool] | None:
    """The gold answer's number when the gold is nothing but a number (with its units)."""
    return _bare_number(answer)


# --------------------------------------------------------------------------------------------
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


def _choice_texts(metadata: Mapping) -> dict[str, str]:
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


def _bare_choice(answer: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The option an answer names when the answer is *only* that: ``B``, ``(b)``, ``[B]``, ``B.``,
    ``B) blue``, ``option D``, ``\\text{A}``, or exactly an option's text."""
    text = _clean_answer(answer)
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


def _find_choice(text: str, choices: Mapping[str, str] | None = None) -> str | None:
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
    or, in a longer answer, "The answer is (B)" and the other written forms (:func:`_find_choice`)."""
    return _bare_choice(answer, choices) or _find_choice(_clean_answer(answer), choices)


# --------------------------------------------------------------------------------------------
# Math (math-verify): what the grader worker runs


_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt pi inf infty "
    "lim max min mod gcd lcm det deg frac dfrac tfrac cdot times div pm mp le ge leq geq neq ne approx "
    "left right text mathrm mathbf boxed circ degree degrees or and".split()
) | _UNITS
_MATH_GROUP_RE = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\\$])\$(?=[^\s$])[^$\n]*?[^\s$\\]\$|(?<![\\$])\$[^\s$]\$", re.S)
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_SCI_TOKEN_RE = re.compile(r"([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d{1,4})")


def _math_token(core: str) -> str | None:
    """A bare token of prose as math-verify should see it: a number (rewritten plain), an expression
    (wrapped in ``$...$`` so it is parsed whole), or None for a token that holds no maths (junk)."""
    parsed = _token_value(core)
    if parsed is not None:
        sci = _SCI_TOKEN_RE.fullmatch(core)
        if sci:
            return f"${sci.group(1)}\\times 10^{{{sci.group(2)}}}$"
        match = _NUMBER_TOKEN_RE.fullmatch(core)
        if match.group("unit"):
            return f"${core}$"  # math-verify drops units ("12cm" is 12) but keeps variables ("2x")
        number = f"{match.group('sign') or match.group('sign2')}{match.group('body')}"
        if match.group("den"):
            return f"${number}/{match.group('den')}$"
        if match.group("pow") or match.group("pow2"):
            return f"${number}^{{{match.group('pow') or match.group('pow2')}}}$"
        return number + ("%" if match.group("pct") else "")
    if not re.fullmatch(r"[0-9A-Za-z\\{}^_+\-*/=().,|!<>\[\]'√π×÷·≤≥]+", core):
        return None
    bare = _LATEX_COMMAND_RE.sub(" ", core)
    if (
        re.search(r"[A-Za-z]\d", bare)  # "a3b", "x2", "H2O": an identifier, not a number
        or any(w.casefold() not in _MATH_WORDS for w in re.findall(r"[A-Za-z]{2,}", bare))  # "COVID-19"
        or re.search(r"\d\.\d+\.\d", bare)  # "7.5.3"
        or re.search(r"(?<![\d.])0\d", bare)  # "2019-05-07"
        or re.search(r"\d/\d+/\d", bare)  # "3/4/2020"
        or re.search(r"\d,\d", bare)  # "1,2": a list or a decimal comma, never sure which
        or bare.count("(") != bare.count(")") or bare.count("{") != bare.count("}")
    ):
        return None
    return f"${core}$"


def _math_guard(text: str) -> str:
    """``text`` rewritten so that math-verify's extraction cannot read part of a token as an answer.

    math-verify's plain-number rule needs no boundary after the number, so in prose it reads "2" out
    of ``2^{10}`` and "7.5" out of ``7.5.3``. Maths already delimited (``$...$``, ``\\(...\\)``,
    ``\\[...\\]``) is kept; every other token is made explicit: numbers plain (currency dropped,
    ``1.2e3`` as ``1.2\\times 10^{3}``), expressions inside ``$...$``, and tokens that only contain
    digits (identifiers, versions, dates) replaced by ``?``.
    """
    out, last = [], 0
    for group in _MATH_GROUP_RE.finditer(text):
        out.append(_guard_prose(text[last : group.start()]))
        out.append(f" {group.group(0)} ")
        last = group.end()
    out.append(_guard_prose(text[last:]))
    return "".join(out)


_TUPLE_RE = re.compile(r"[(\[]\s*[^()\[\]\s,]+(?:\s*,\s*[^()\[\]\s,]+)+\s*[)\]]")
"""A bracketed, comma-separated group ("(2, 3)", "[1, 5]"): a tuple or an interval, parsed whole."""


def _guard_prose(prose: str) -> str:
    prose = _DIGIT_GROUP_RE.sub("", prose.replace("−", "-")).replace("{,}", ",")
    prose = _TIMES_TEN_RE.sub(lambda m: f"{m.group(1)}e{m.group(2) or m.group(3)}", prose)
    out, last = [], 0
    for group in _TUPLE_RE.finditer(prose):
        elements = [e.strip() for e in group.group(0)[1:-1].split(",")]
        if all(_math_token(e) is not None for e in elements) and any(re.search(r"\d", e) for e in elements):
            out.extend((_guard_words(prose[last : group.start()]), f" ${group.group(0)}$ "))
            last = group.end()
    out.append(_guard_words(prose[last:]))
    return "".join(out)


def _guard_words(prose: str) -> str:
    pieces = re.split(r"(\s+)", prose)
    for i, piece in enumerate(pieces):
        if not piece or piece.isspace() or not re.search(r"[\d\\]", piece):
            continue
        core = _strip_math_token(piece)
        start = piece.find(core) if core else 0
        head, tail = piece[:start], piece[start + len(core) :]
        rewritten = _math_token(core) if core else None
        pieces[i] = f"{head} {rewritten if rewritten is not None else '?'} {tail}"
    return "".join(pieces)


def _strip_math_token(piece: str) -> str:
    """Sentence punctuation and unbalanced brackets off a prose token; currency symbols off a number."""
    core = _strip_punctuation(piece)
    core = re.sub(rf"^([-+]?)(?:\\\$|US\$|[{_CURRENCY}])", r"\1", core)
    return re.sub(rf"(?:\\\$|[{_CURRENCY}])$", "", core)


def _bare_math(text: str) -> str | None:
    """``text`` when it is nothing but a mathematical answer ("42", "$\\frac12$", "x = 2", "12 cm"),
    else None: prose that merely contains maths commits to no answer."""
    cleaned = _clean_answer(text)
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$")):
        if cleaned.startswith(opening) and cleaned.endswith(closing) and len(cleaned) > len(opening) + len(closing):
            cleaned = cleaned[len(opening) : -len(closing)].strip()
    if not cleaned or "\n" in cleaned:
        return None
    words = re.findall(r"[A-Za-z]{2,}", _LATEX_COMMAND_RE.sub(" ", cleaned))
    if any(w.casefold() not in _MATH_WORDS for w in words) or re.search(r"(?<![A-Za-z\\])[A-Za-z]\d", cleaned):
        return None
    return _math_answer(cleaned)


def _math_answer(marked: str) -> str:
    """A marked answer with the spellings math-verify's LaTeX parser misses made plain: a currency
    symbol before a number is dropped, ``1.2e3`` becomes ``1.2\\times 10^{3}``."""
    text = re.sub(rf"(?:\\\$|[{_CURRENCY[1:]}])(?=\s*[-+]?\d)", "", marked)
    return re.sub(r"(?<![\w.\\])([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d{1,4})(?![\w.])", r"\1\\times 10^{\2}", text)


def _as_latex(text: str) -> str:
    """Inline-math delimiters around a bare answer (math-verify reads ``\\%`` inside ``$..$``, not inside ``\\boxed{}``)."""
    return text if "$" in text else f"${text}$"


_LATEX_PERCENT_RE = re.compile(r"(?<=\d)\s*\\%")
_MATRIX_BEGIN_RE = re.compile(r"\\begin\s*\{(?:[pbB]?matrix|smallmatrix)\*?\}(?:\[[lcr]\])?")
_MATRIX_END_RE = re.compile(r"\\end\s*\{(?:[pbB]?matrix|smallmatrix)\*?\}")


def _math_spelling(text: str) -> str:
    """One spelling for what math-verify reads differently by how it is written: a LaTeX percent
    ``50\\%`` is the percent ``50%`` (math-verify reads ``\\%`` as a unit and drops it, but
    ``50%`` as the percent, which matches 50 and 0.5), and every matrix environment is ``pmatrix``
    (its parser knows ``pmatrix``/``bmatrix`` but not ``Bmatrix``, ``smallmatrix`` or the starred
    forms). ``vmatrix``/``Vmatrix`` are left alone: they write a determinant and a norm."""
    text = _LATEX_PERCENT_RE.sub("%", text)
    text = _MATRIX_BEGIN_RE.sub(r"\\begin{pmatrix}", text)
    return _MATRIX_END_RE.sub(r"\\end{pmatrix}", text)


def _parse_gold(gold: str) -> list:
    from math_verify import parse  # heavy (sympy): loaded in the grader worker process only

    parsed = parse(_as_latex(_math_spelling(gold)), parsing_timeout=None)
    if not parsed:
        raise ValueError(f"gold answer {gold!r} could not be parsed by math-verify")
    return parsed


def _math_verify_equal(gold: str, prediction: str) -> bool:
    """math-verify with its signal-based timeouts off (the caller bounds the time).

    Conventions are math-verify's own: ``50\\%`` matches ``50`` and ``0.5``; ``\\frac{1}{2}`` matches
    ``0.5``; ``x=2`` matches ``2``; sets are unordered; ``1,000`` is one thousand; a matrix is its values.
    """
    from math_verify import parse, verify  # heavy (sympy): grader worker only

    gold_parsed = _parse_gold(gold)
    pred_parsed = parse(_as_latex(_math_spelling(prediction)), parsing_timeout=None)
    if not pred_parsed:
        return False  # the model's answer is not maths: wrong, not a grader failure
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True))


def _math_verify_find(gold: str, text: str) -> tuple[bool, str | None]:
    """``(correct, extracted)`` for an unmarked final answer text: math-verify's own extraction
    (LaTeX, then plain expressions, each preferring "answer" anchors, then the last match) over
    :func:`_math_guard` of the text."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # heavy (sympy): grader worker only

    gold_parsed = _parse_gold(gold)
    pred_parsed = parse(_math_guard(_math_spelling(text)), extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        parsing_timeout=None)
    if not pred_parsed:
        return False, None
    extracted = str(pred_parsed[-1])
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)), extracted


# --------------------------------------------------------------------------------------------
# Verifiers: (response, answer, metadata) -> VerifyResult. Pure; failures are the Grader's job.


def verify_math(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Symbolic equivalence of the final answer and the gold answer (math-verify). A numeric gold
    also accepts a short answer whose one number has a unit ("It is 12 cm long."; :func:`_short_quantity`)."""
    marked = extract_final_answer(response)
    if marked is None:
        text, after_think = final_answer_text(response)
        if after_think:
            correct, extracted = _math_verify_find(answer, text) if text else (False, None)
            return VerifyResult(float(correct), correct, extracted)
        marked = _bare_math(text)
        if marked is None:
            correct = _quantity_matches(text, answer)
            return VerifyResult(float(correct), correct, text if correct else None)
    correct = _math_verify_equal(answer, _math_answer(marked)) or _quantity_matches(marked, answer)
    return VerifyResult(float(correct), correct, marked)


def _quantity_matches(text: str, answer: str) -> bool:
    """A numeric gold against a short answer's one number with a unit (1e-6 relative, percent as
    :func:`_numbers_match`)."""
    gold = _numeric_gold(answer)
    pred = _short_quantity(text) if gold is not None else None
    return pred is not None and _numbers_match(pred, gold, 1e-6, 1e-9)


def verify_choice(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Multiple choice: the answer may be given as a letter or as the option's text."""
    choices = _choice_texts(metadata)
    gold = extract_choice(answer, choices)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} names no option of {sorted(choices) or 'A-Z'}")
    marked = extract_final_answer(response)
    if marked is not None:
        extracted, letter = marked, extract_choice(marked[:MAX_FINAL_TEXT_CHARS], choices)
    else:
        text, after_think = final_answer_text(response)
        letter = _bare_choice(text, choices) or (_find_choice(text, choices) if after_think else None)
        extracted = letter
    correct = letter is not None and letter == gold
    return VerifyResult(float(correct), correct, extracted)


def verify_numeric(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """|pred - gold| <= max(abs_tol, rel_tol * |gold|); ``metadata`` may set ``rel_tol``/``abs_tol``.

    Defaults are near-exact (rel 1e-6); datasets with "relaxed accuracy" (ChartQA: 5%) set their own.
    A marked answer is read for its first number ("about 12 cm"), an unmarked text after ``</think>``
    for its last one (the usual place of a result), a response without either must be a bare number.
    Percent: see :func:`_numbers_match`.
    """
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} holds no number")
    marked = extract_final_answer(response)
    if marked is not None:
        extracted, pred = marked, parse_number(marked[:MAX_FINAL_TEXT_CHARS])
    else:
        text, after_think = final_answer_text(response)
        pred, extracted = _bare_number(text), text
        if pred is None and after_think:
            found = _number_tokens(text)
            pred, extracted = ((found[-1][0], found[-1][1]), found[-1][2]) if found else (None, None)
        elif pred is None:
            pred = _short_quantity(text)  # "It is 12 cm long."
    if pred is None:
        return VerifyResult(0.0, False, extracted)
    rel_tol = float(metadata.get("rel_tol", 1e-6))
    abs_tol = float(metadata.get("abs_tol", metadata.get("tolerance", 1e-9)))
    correct = _numbers_match(pred, gold, rel_tol, abs_tol)
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


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class VerifierSpec:
    fn: Callable[[str, str, Mapping], VerifyResult]
    isolated: bool = False
    """Run in a killable worker process (for verifiers that can hang: sympy)."""


VERIFIERS: dict[str, VerifierSpec] = {}


def register_verifier(*names: str, isolated: bool = False):
    """Register ``fn`` under each ``data_source`` name. An isolated verifier must be importable
    at module level (it is sent to a worker process by reference)."""

    def decorate(fn):
        for name in names:
            VERIFIERS[name.lower()] = VerifierSpec(fn, isolated)
        return fn

    return decorate


register_verifier("math", "gsm8k", "math500", "aime", "geo3k", "geometry3k", "hiyouga/geometry3k", "mmk12", isolated=True)(verify_math)
register_verifier("choice", "multiple_choice", "mcq")(verify_choice)
register_verifier("numeric", "number", "chartqa")(verify_numeric)
register_verifier("search_qa", "qa", "nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "popqa")(verify_search_qa)


def get_verifier(data_source: str) -> VerifierSpec:
    """The verifier of ``data_source`` (case-insensitive; ``org/name`` also tries ``name``)."""
    key = data_source.lower()
    if key in VERIFIERS:
        return VERIFIERS[key]
    if "/" in key and key.rsplit("/", 1)[1] in VERIFIERS:
        return VERIFIERS[key.rsplit("/", 1)[1]]
    raise KeyError(f"no verifier for data_source {data_source!r}; registered: {sorted(VERIFIERS)}")


# --------------------------------------------------------------------------------------------
# Deadline-bounded execution in worker processes


class GraderTimeout(Exception):
    pass


class GraderCrash(Exception):
    pass


def _write_frame(stream, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise EOFError("grader worker closed its pipe")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_raw_frame(stream) -> bytes:
    (length,) = struct.unpack(">I", _read_exact(stream, 4))
    return _read_exact(stream, length)


def _read_frame(stream) -> Any:
    return pickle.loads(_read_raw_frame(stream))


def _serve(warmup: tuple[str, ...]) -> None:
    """Worker main loop (runs in the child): import heavy modules once, then answer ``(fn, args)`` frames.

    The child talks over its stdin/stdout pipes; fd 1 is pointed at stderr first so that a stray
    ``print`` in a verifier cannot corrupt the protocol.
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    for module in warmup:
        try:
            importlib.import_module(module)
        except Exception:  # a missing optional module shows up as a crash of the job that needs it
            pass
    _write_frame(out, "ready")
    while True:
        try:
            raw = _read_raw_frame(inp)
        except EOFError:
            return
        try:
            job = pickle.loads(raw)
            if job is None:
                return
            fn, args = job
            reply = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - everything (an unloadable job too) goes back as a crash
            reply = (False, f"{type(e).__name__}: {e}")
        _write_frame(out, reply)


class _Worker:
    """One grader subprocess.

    A plain ``subprocess`` rather than ``multiprocessing``: spawn/forkserver re-import the
    parent's ``__main__`` (a training script without a main guard would run again), and fork is
    unsafe in a process that runs threads (rllm's env executor, Ray).
    """

    def __init__(self, warmup: tuple[str, ...], startup_timeout_s: float) -> None:
        code = (
            "import sys; sys.path[:0] = " + repr([p for p in sys.path if p]) + "; "
            "from axpo_rllm.envs.verifiers import _serve; _serve(" + repr(tuple(warmup)) + ")"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        try:
            ready = self._receive(startup_timeout_s)
        except (GraderTimeout, EOFError) as e:
            self.kill()
            raise GraderCrash(f"grader worker did not start within {startup_timeout_s:g}s ({e})") from None
        if ready != "ready":
            self.kill()
            raise GraderCrash(f"grader worker sent {ready!r} instead of 'ready'")

    def _receive(self, timeout_s: float) -> Any:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not readable:
            raise GraderTimeout(f"no verdict within {timeout_s:g}s")
        return _read_frame(self.process.stdout)

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        _write_frame(self.process.stdin, (fn, args))
        ok, value = self._receive(timeout_s)
        if not ok:
            raise GraderCrash(value)
        return value

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self) -> None:
        try:
            _write_frame(self.process.stdin, None)
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class DeadlinePool:
    """Up to ``size`` warm worker processes; a job that overruns its deadline has its worker killed.

    Workers start on first use and import ``warmup`` modules before taking jobs, so the import time
    of sympy/math-verify never counts against a job's deadline.
    """

    def __init__(self, size: int = 2, warmup: tuple[str, ...] = ("math_verify",), startup_timeout_s: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"DeadlinePool size must be >= 1, got {size}")
        self._warmup = warmup
        self._startup_timeout_s = startup_timeout_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        """``fn(*args)`` in a worker; raises :class:`GraderTimeout` or :class:`GraderCrash`."""
        with self._slots:
            worker = self._take_worker()
            try:
                result = worker.run(fn, args, timeout_s)
            except GraderCrash:
                self._give_back(worker)  # the job raised; the worker itself is fine
                raise
            except GraderTimeout:
                worker.kill()
                raise
            except Exception as e:  # pipe broken, worker died, job not picklable: start afresh next time
                worker.kill()
                raise GraderCrash(f"grader worker failed ({type(e).__name__}: {e})") from None
            except BaseException:
                worker.kill()
                raise
            self._give_back(worker)
            return result

    def _take_worker(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise GraderCrash("DeadlinePool is closed")
            if self._idle:
                return self._idle.pop()
        return _Worker(self._warmup, self._startup_timeout_s)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


_default_pool: DeadlinePool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> DeadlinePool:
    """The process-wide pool (lazily created; sized for the grading load of one trainer process)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = DeadlinePool(size=max(1, min(4, (os.cpu_count() or 2) // 2)))
            atexit.register(_default_pool.close)
        return _default_pool


# --------------------------------------------------------------------------------------------
# The grader


class Grader:
    """Grades final answers by data source; every failure is reward 0 + a counted, logged failure.

    ``timeout_s`` bounds isolated verifiers (math). ``stats`` defaults to :data:`GRADER_STATS`.
    """

    def __init__(self, timeout_s: float = 10.0, stats: GraderStats | None = None, pool: DeadlinePool | None = None) -> None:
        self.timeout_s = timeout_s
        self.stats = stats if stats is not None else GRADER_STATS
        self._pool = pool

    @property
    def pool(self) -> DeadlinePool:
        return self._pool if self._pool is not None else default_pool()

    def grade(self, data_source: str, response: str, answer: str, metadata: Mapping | None = None) -> VerifyResult:
        metadata = metadata or {}
        started = time.perf_counter()
        try:
            spec = get_verifier(data_source)
            if spec.isolated:
                result = self.pool.run(spec.fn, (response, answer, dict(metadata)), self.timeout_s)
            else:
                result = spec.fn(response, answer, metadata)
        except GraderTimeout as e:
            result = VerifyResult.failed(f"timeout: {e}")
        except GraderCrash as e:
            result = VerifyResult.failed(f"crash: {e}")
        except Exception as e:  # noqa: BLE001 - any verifier bug is a counted failure, not a zero
            result = VerifyResult.failed(f"crash: {type(e).__name__}: {e}")
        self.stats.record(data_source, result.failure)
        if result.failure is not None:
            logger.warning(
                "grader failure for data_source=%r after %.2fs: %s (response tail %r)",
                data_source,
                time.perf_counter() - started,
                result.failure,
                response[-120:],
            )
        return result

    def grade_task(self, task: Any, response: str) -> VerifyResult:
        """Grade a :class:`axpo_rllm.core.records.Task`'s final response."""
        return self.grade(task.data_source, response, task.answer, task.metadata)


_shared_grader: Grader | None = None


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None, **kwargs: Any) -> dict:
    """verl's reward-function contract (``custom_reward_function.path: <this file>``, ``name: compute_score``).

    verl's reward loop calls it in an executor thread, the place where ``signal.alarm`` graders
    fail; this one is thread-safe. Returns ``score`` plus ``acc`` and ``grader_failure`` (floats,
    so verl can average them into step metrics). A list ``ground_truth`` is read as aliases.
    """
    global _shared_grader
    if _shared_grader is None:
        _shared_grader = Grader()
    answer = json.dumps(list(ground_truth)) if isinstance(ground_truth, (list, tuple)) else str(ground_truth)
    metadata = extra_info if isinstance(extra_info, Mapping) else {}
    result = _shared_grader.grade(data_source, solution_str, answer, metadata)
    return {"score": result.reward, "acc": float(result.correct), "grader_failure": float(result.failure is not None)}

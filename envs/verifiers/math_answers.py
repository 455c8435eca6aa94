"""Math answers for math-verify: what of an answer is math, spelled so math-verify parses it,
and the comparisons the grader worker runs."""

from __future__ import annotations

import re

from .answers import clean_answer
from .numbers import CURRENCY, DIGIT_GROUP_RE, NUMBER_TOKEN_RE, TIMES_TEN_RE, UNITS, strip_punctuation, token_value


_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt pi inf infty "
    "lim max min mod gcd lcm det deg frac dfrac tfrac cdot times div pm mp le ge leq geq neq ne approx "
    "left right text mathrm mathbf boxed circ degree degrees or and".split()
) | UNITS
_MATH_GROUP_RE = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\\$])\$(?=[^\s$])[^$\n]*?[^\s$\\]\$|(?<![\\$])\$[^\s$]\$", re.S)
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_SCI_TOKEN_RE = re.compile(r"([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d{1,4})")


def _math_token(core: str) -> str | None:
    """A bare token of prose as math-verify should see it: a number (rewritten plain), an expression
    (wrapped in ``$...$`` so it is parsed whole), or None for a token that holds no maths (junk)."""
    parsed = token_value(core)
    if parsed is not None:
        sci = _SCI_TOKEN_RE.fullmatch(core)
        if sci:
            return f"${sci.group(1)}\\times 10^{{{sci.group(2)}}}$"
        match = NUMBER_TOKEN_RE.fullmatch(core)
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
    prose = DIGIT_GROUP_RE.sub("", prose.replace("−", "-")).replace("{,}", ",")
    prose = TIMES_TEN_RE.sub(lambda m: f"{m.group(1)}e{m.group(2) or m.group(3)}", prose)
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
    core = strip_punctuation(piece)
    core = re.sub(rf"^([-+]?)(?:\\\$|US\$|[{CURRENCY}])", r"\1", core)
    return re.sub(rf"(?:\\\$|[{CURRENCY}])$", "", core)


def bare_math(text: str) -> str | None:
    """``text`` when it is nothing but a mathematical answer ("42", "$\\frac12$", "x = 2", "12 cm"),
    else None: prose that merely contains maths commits to no answer."""
    cleaned = clean_answer(text)
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$")):
        if cleaned.startswith(opening) and cleaned.endswith(closing) and len(cleaned) > len(opening) + len(closing):
            cleaned = cleaned[len(opening) : -len(closing)].strip()
    if not cleaned or "\n" in cleaned:
        return None
    words = re.findall(r"[A-Za-z]{2,}", _LATEX_COMMAND_RE.sub(" ", cleaned))
    if any(w.casefold() not in _MATH_WORDS for w in words) or re.search(r"(?<![A-Za-z\\])[A-Za-z]\d", cleaned):
        return None
    return math_answer(cleaned)


def math_answer(marked: str) -> str:
    """A marked answer with the spellings math-verify's LaTeX parser misses made plain: a currency
    symbol before a number is dropped, ``1.2e3`` becomes ``1.2\\times 10^{3}``."""
    text = re.sub(rf"(?:\\\$|[{CURRENCY[1:]}])(?=\s*[-+]?\d)", "", marked)
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


def math_verify_equal(gold: str, prediction: str) -> bool:
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


def math_verify_find(gold: str, text: str) -> tuple[bool, str | None]:
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

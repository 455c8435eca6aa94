"""Numbers in answers: a number is a whole token, never part of one."""

from __future__ import annotations

import math
import re

from .answers import clean_answer, unwrap_emphasis

# Numbers
#
# A number is a whole token: sign, currency (``$ € £ ¥ ₹``), digits with thousands separators
# (``1,234.5``), a fraction (``3/4``, ``\frac{3}{4}``), scientific notation (``1.2e3``,
# ``1.2 \times 10^3``, ``10^{3}``), a percent sign or the word ``percent``, a unit glued on or
# standing beside it (``12cm``, ``12 cm``). A token with anything else in it ("7.5.3", "a3b",
# "2019-05-07", "3rd", "2x") holds no number at all.

UNITS = frozenset(
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

CURRENCY = "$€£¥₹"
NUMBER_TOKEN_RE = re.compile(
    rf"(?P<sign>[-+]?)[{CURRENCY}]?(?P<sign2>[-+]?)"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>(?:\d+(?:\.\d+)?|\.\d+)))?"
    r"(?:[eE](?P<exp>[-+]?\d{1,4}))?"
    r"(?:\^(?:\{(?P<pow>[-+]?\d{1,4})\}|(?P<pow2>[-+]?\d{1,4})))?"
    rf"(?P<pct>%)?(?P<unit>[A-Za-zµ°²³/]+)?[{CURRENCY}]?"
)
_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?(?:\d+(?:\.\d+)?|\.\d+))\s*\}\s*\{\s*(-?(?:\d+(?:\.\d+)?|\.\d+))\s*\}")
TIMES_TEN_RE = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:\\times|×|\\cdot|·|\*|x)\s*10\s*\^\s*(?:\{\s*([-+]?\d{1,4})\s*\}|([-+]?\d{1,4}))"
)
_TOKEN_SPLIT_RE = re.compile(r"[\s=≈~]+")
_QUOTES = "\"'“‘”’*`"
_CLOSING = {"(": ")", "[": "]", "{": "}"}
_OPENING = {v: k for k, v in _CLOSING.items()}


DIGIT_GROUP_RE = re.compile(r"(?<=\d)(?:\\,|\\ |~|[\u00a0\u202f\u2009])(?=\d{3}(?!\d))")
"""A thin or non-breaking space between digit groups ("1\\,000", "1 000" with U+202F): one number.
(A plain space is not: "3 100" is as often two numbers as one.)"""


def _latex_to_plain(text: str) -> str:
    """The few LaTeX spellings of numbers, as plain text (``\\frac{3}{4}`` -> ``3/4``, ``\\%`` -> ``%``)."""
    text = DIGIT_GROUP_RE.sub("", text.replace("−", "-"))
    text = text.replace("\\!", "").replace("\\,", " ").replace("{,}", ",")
    text = text.replace("\\%", "%").replace("\\$", "$").replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}", r" \1 ", text)
    text = _FRAC_RE.sub(lambda m: f" {m.group(1)}{m.group(2)}/{m.group(3)} ", text)
    return TIMES_TEN_RE.sub(lambda m: f"{m.group(1)}e{m.group(2) or m.group(3)}", text)


def strip_punctuation(token: str) -> str:
    """Quotes, sentence punctuation and unbalanced brackets off both ends of a token ("(12).", "**5**")."""
    for _ in range(8):  # a few rounds ("(**12**)."); each is linear, so a hostile token costs little
        before = token
        token = unwrap_emphasis(token.strip(_QUOTES).rstrip(".,;:!?"))
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
    token = strip_punctuation(token)
    for _ in range(4):
        if len(token) > 1 and ((token[0] in _CLOSING and token[-1] == _CLOSING[token[0]]) or token[0] == token[-1] == "$"):
            token = strip_punctuation(token[1:-1])
        else:
            break
    return token


def token_value(token: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` when ``token`` (already stripped) is one number, else None."""
    match = NUMBER_TOKEN_RE.fullmatch(token)
    if match is None or (match.group("sign") and match.group("sign2")):
        return None
    unit = match.group("unit")
    if unit is not None and unit.casefold() not in UNITS:
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


def number_tokens(text: str) -> list[tuple[float, bool, str]]:
    """Every whole-token number in ``text``, in order: ``(value, is_percent, token)``."""
    tokens = [t for t in _TOKEN_SPLIT_RE.split(_latex_to_plain(text)) if t]
    found = []
    for i, raw in enumerate(tokens):
        token = _strip_token(raw)
        parsed = token_value(token) if token else None
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
    found = number_tokens(text)
    return (found[0][0], found[0][1]) if found else None


def bare_number(text: str) -> tuple[float, bool] | None:
    """The number when ``text`` is nothing but one number and its units ("12 cm", "$5", "50 percent")."""
    found = number_tokens(text)
    if len(found) != 1:
        return None
    rest = [_strip_token(t).casefold() for t in _TOKEN_SPLIT_RE.split(_latex_to_plain(text)) if _strip_token(t)]
    words = [t for t in rest if t != found[0][2].casefold()]
    return (found[0][0], found[0][1]) if all(w in UNITS or not re.search(r"\w", w) for w in words) else None


def numbers_match(pred: tuple[float, bool], gold: tuple[float, bool], rel_tol: float, abs_tol: float) -> bool:
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


def short_quantity(text: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` when ``text`` is a short answer (one line, at most
    :data:`SHORT_ANSWER_WORDS` words) holding exactly one number, that number carries a unit
    (``12 cm``, ``12cm``, ``$5``, ``50%``), and no word hedges it ("not", "more than"). A number
    without a unit in prose ("no final answer at all, 7") commits to nothing."""
    text = clean_answer(text)
    if not text or "\n" in text:
        return None
    words = [w for w in _TOKEN_SPLIT_RE.split(_latex_to_plain(text)) if w]
    plain = [_strip_token(w).casefold() for w in words]
    if len(words) > SHORT_ANSWER_WORDS or any(w in _HEDGES or w.endswith(("n't", "n’t")) for w in plain):
        return None
    found = number_tokens(text)
    if len(found) != 1:
        return None
    value, is_percent, token = found[0]
    at = plain.index(token.casefold()) if token.casefold() in plain else -1
    following = plain[at + 1] if 0 <= at < len(plain) - 1 else ""
    match = NUMBER_TOKEN_RE.fullmatch(token)
    has_unit = is_percent or bool(match and match.group("unit")) or any(c in token for c in CURRENCY) or following in UNITS
    return (value, is_percent) if has_unit else None


def numeric_gold(answer: str) -> tuple[float, bool] | None:
    """The gold answer's number when the gold is nothing but a number (with its units)."""
    return bare_number(answer)

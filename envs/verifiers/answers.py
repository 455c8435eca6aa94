"""Where a final answer is read from in model output (untrusted text), and text normalisation."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

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


def unwrap_emphasis(text: str) -> str:
    """``text`` without the markdown emphasis wrapping all of it (nested too: ``***42***``)."""
    for _ in range(3):
        match = _EMPHASIS_RE.fullmatch(text)
        if match is None:
            break
        text = match.group(2)
    return text


def clean_answer(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^\*\*|\*\*$", "", text).strip().rstrip(".").strip()  # markdown bold, full stop
    text = unwrap_emphasis(text).rstrip(".").strip()  # "*42*", "_42_."
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
        return extract_boxed(inner) or clean_answer(inner) or None
    hashes = _HASHES_RE.findall(response)
    if hashes:
        return clean_answer(hashes[-1]) or None
    lines = _ANSWER_LINE_RE.findall(response)
    if lines:
        line = lines[-1].splitlines()[0]
        nested = _NESTED_ANSWER_RE.match(line)  # "Final Answer: The final answer is $7$." (Minerva's format)
        return clean_answer(nested.group(1) if nested else line) or None
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

"""Parsing one assistant turn: reasoning, then zero or more hermes/Qwen ``<tool_call>{json}</tool_call>``
calls, or a final answer.

Two layers, both pure:

- :func:`parse_turn_text` reads the decoded text and says what the turn *is*: an answer, or the
  calls it makes (each valid, or malformed with a model-facing error message), with the character
  span of every call;
- :func:`locate_calls` maps those spans onto the turn's token ids (``<tool_call>`` /
  ``</tool_call>`` are single added tokens in Qwen tokenizers; we never re-tokenise text).

Rules (grounded in the bugs filed against vLLM's hermes / Qwen parsers):

- reasoning is ``<think>…</think>``; with a chat format whose generation prompt opens ``<think>``
  (Qwen3-*-Thinking) the turn starts inside it (``think_open=True``). A ``</think>`` inside the JSON
  of a call drafted in the reasoning does not end it. Calls inside the reasoning are drafts, never
  executed; so are calls shown inside markdown code (fenced blocks or inline spans);
- after the reasoning every ``<tool_call>`` opens a call, in order: the body is read with
  ``json.JSONDecoder.raw_decode``, so a ``</tool_call>``, ``<tool_call>`` or ``<think>`` inside a JSON
  string argument is part of the argument; the JSON is strict (``NaN`` / ``Infinity`` are errors);
  ``arguments`` may be double-encoded as a JSON string (decoded once more);
- several calls in one turn (Qwen/hermes parallel calls) are all returned, in order; prose before,
  between or after them is ignored (it is not an answer and does not void a call);
- malformed: bad JSON, no ``name``, arguments not an object, an unknown tool, text inside the call
  after its JSON, a call with no ``</tool_call>`` (cut by the token limit). A malformed call is still
  a tool call (it counts as tool use); the model sees its ``error``.

For AXPO (docs/algorithm.md §2–§3) a multi-call turn is cut at the first call's opener, and its confidence
c_s is the first call's content: the later calls of the turn are part of what is resampled.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

__all__ = [
    "TurnKind",
    "ParsedCall",
    "ParsedTurn",
    "CallTokens",
    "parse_turn_text",
    "locate_calls",
    "THINK_OPEN",
    "THINK_CLOSE",
    "CALL_OPEN",
    "CALL_CLOSE",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class TurnKind(str, enum.Enum):
    ANSWER = "answer"
    """No call after the reasoning: the turn is the final answer."""
    TOOL_CALL = "tool_call"
    """At least one call after the reasoning is well formed and names a known tool."""
    MALFORMED_CALL = "malformed_call"
    """Calls were opened but none can be executed; each call's ``error`` says why (shown to the model)."""


@dataclass(frozen=True)
class ParsedCall:
    """One call of a turn. ``[start, end)`` is its span in the turn text, from ``<tool_call>`` to
    after ``</tool_call>`` (to the end of the text when it is not closed)."""

    start: int
    end: int
    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: str = ""
    """Empty for a valid call; else the model-facing reason it cannot run."""

    @property
    def valid(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class ParsedTurn:
    kind: TurnKind
    thinking: str = ""
    """The reasoning text (empty when absent)."""
    answer: str = ""
    """For an answer turn: the text after the reasoning (stripped)."""
    calls: tuple[ParsedCall, ...] = ()
    """Every call after the reasoning, in order (valid or not)."""
    think_closed: bool = True
    """False when the reasoning was opened and never closed (the whole turn is reasoning)."""

    @property
    def first(self) -> ParsedCall | None:
        return self.calls[0] if self.calls else None

    @property
    def name(self) -> str:
        """The first call's tool name (empty for an answer)."""
        return self.calls[0].name if self.calls else ""

    @property
    def arguments(self) -> dict:
        return self.calls[0].arguments if self.calls else {}

    @property
    def error(self) -> str:
        """The first malformed call's error (empty when every call is valid)."""
        return next((c.error for c in self.calls if c.error), "")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)
_FENCE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.S)


def _code_spans(text: str, start: int) -> list[tuple[int, int]]:
    """Markdown code in ``text[start:]``: fenced blocks (an unclosed fence runs to the end) and
    inline spans. Scanned from ``start`` so that backticks inside earlier calls' JSON pair with nothing."""
    return [m.span() for m in _FENCE.finditer(text, start)]


def _inside(pos: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def _json_span(text: str, opener: int) -> tuple[int, int] | None:
    """The span of the JSON value right after the ``<tool_call>`` at ``opener`` (None if it does not parse)."""
    body = opener + len(CALL_OPEN)
    start = body + len(text[body:]) - len(text[body:].lstrip())
    try:
        _, end = _STRICT.raw_decode(text, start)
    except ValueError:
        return None
    return start, end


def _reasoning(text: str, think_open: bool) -> tuple[int, int, int, bool]:
    """``(start, end, rest, closed)``: the reasoning is ``text[start:end]``, the turn goes on at
    ``rest`` (after ``</think>``). ``(0, 0, 0, True)`` when the turn has no reasoning.

    The reasoning opens with a leading ``<think>`` (or is already open: ``think_open``, or a
    ``</think>`` with no opener, as Qwen3 templates pre-open it) and closes at the first
    ``</think>`` that is not inside markdown code or inside the JSON of a call drafted in it.
    """
    code = _code_spans(text, 0)
    opened = text.find(THINK_OPEN)
    if opened >= 0 and (_inside(opened, code) or text[:opened].strip()):
        opened = -1  # a <think> after other text (or in code, or in a JSON string) opens nothing
    start = opened + len(THINK_OPEN) if opened >= 0 else 0
    drafts = [span for i in _openers(text, start, code) if (span := _json_span(text, i)) is not None]
    pos = start
    while (close := text.find(THINK_CLOSE, pos)) >= 0:
        if not _inside(close, code) and not _inside(close, drafts):
            return start, close, close + len(THINK_CLOSE), True
        pos = close + len(THINK_CLOSE)
    if opened >= 0 or think_open:
        return start, len(text), len(text), False
    return 0, 0, 0, True


def _openers(text: str, start: int, code: Sequence[tuple[int, int]]) -> list[int]:
    out, pos = [], start
    while (i := text.find(CALL_OPEN, pos)) >= 0:
        if not _inside(i, code):
            out.append(i)
        pos = i + len(CALL_OPEN)
    return out


def _parse_call(text: str, opener: int, tool_names: Collection[str]) -> ParsedCall:
    """The call opened at ``opener`` (its span ends after ``</tool_call>``, or at the end of the text)."""
    body = opener + len(CALL_OPEN)
    stripped_at = body + len(text[body:]) - len(text[body:].lstrip())
    try:
        payload, json_end = _STRICT.raw_decode(text, stripped_at)
    except ValueError as exc:
        close = text.find(CALL_CLOSE, body)
        if close < 0:
            return ParsedCall(opener, len(text), error=f"the tool call is not closed with {CALL_CLOSE}")
        message = str(exc) if "not valid JSON" in str(exc) else f"{getattr(exc, 'msg', exc)} at char {getattr(exc, 'pos', 0) - stripped_at}"
        return ParsedCall(opener, close + len(CALL_CLOSE), error=f"the tool call is not valid JSON ({message})")
    tail_at = json_end + len(text[json_end:]) - len(text[json_end:].lstrip())
    if not text.startswith(CALL_CLOSE, tail_at):
        close = text.find(CALL_CLOSE, json_end)
        if close < 0:
            return ParsedCall(opener, len(text), error=f"the tool call is not closed with {CALL_CLOSE}")
        return ParsedCall(opener, close + len(CALL_CLOSE),
                          error=f"unexpected text after the JSON object of the tool call: {text[tail_at:close][:40]!r}")
    end = tail_at + len(CALL_CLOSE)

    def bad(message: str, name: str = "") -> ParsedCall:
        return ParsedCall(opener, end, name=name, error=message)

    if not isinstance(payload, dict):
        return bad(f"the tool call must be a JSON object, got {type(payload).__name__}")
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return bad('the tool call has no "name" string')
    arguments: Any = payload.get("arguments", {})
    if isinstance(arguments, str):  # double-encoded arguments (a known model/parser bug)
        try:
            arguments = _STRICT.decode(arguments)
        except ValueError:
            return bad("the tool call's arguments are a string that is not valid JSON", name)
    if not isinstance(arguments, dict):
        return bad(f'"arguments" must be a JSON object, got {type(arguments).__name__}', name)
    if name not in tool_names:
        return bad(f"unknown tool {name!r}; available tools: {sorted(tool_names)}", name)
    return ParsedCall(opener, end, name=name, arguments=arguments)


def parse_turn_text(text: str, tool_names: Collection[str], *, think_open: bool = False) -> ParsedTurn:
    """What one assistant turn is. ``text`` is the turn decoded with control tokens dropped and
    the agent tokens (``<think>``, ``<tool_call>``) kept; ``think_open``: the generation prompt
    already opened ``<think>`` (the turn starts inside the reasoning)."""
    start, end, rest, closed = _reasoning(text, think_open)
    thinking = text[start:end].strip()
    if not closed:
        return ParsedTurn(TurnKind.ANSWER, thinking=thinking, answer="", think_closed=False)
    calls: list[ParsedCall] = []
    pos = rest
    while found := _openers(text, pos, _code_spans(text, pos)):
        calls.append(_parse_call(text, found[0], tool_names))
        pos = calls[-1].end
    if not calls:
        return ParsedTurn(TurnKind.ANSWER, thinking=thinking, answer=text[rest:].strip())
    kind = TurnKind.TOOL_CALL if any(c.valid for c in calls) else TurnKind.MALFORMED_CALL
    return ParsedTurn(kind, thinking=thinking, calls=tuple(calls))


@dataclass(frozen=True)
class CallTokens:
    """Token positions (within the turn's ids) of one call: ``[open, body)`` is ``<tool_call>``,
    ``[body, end)`` the content up to and including ``</tool_call>`` (or to the turn's end)."""

    open: int
    body: int
    end: int


def locate_calls(
    turn_ids: Sequence[int], calls: Sequence[ParsedCall], *, open_id: int, close_id: int,
    decode: Callable[[Sequence[int]], str],
) -> list[CallTokens | None]:
    """The token span of each parsed call, found by decoding prefixes of ``turn_ids`` (with the
    same ``decode`` that produced the parsed text) at the ``<tool_call>`` / ``</tool_call>`` tokens.

    None for a call whose opener is not the single ``<tool_call>`` token (the text names a call
    the ids do not hold: not executable as recorded).
    """
    ids = list(turn_ids)
    opens = {len(decode(ids[:i])): i for i, t in enumerate(ids) if t == open_id}
    closes = {len(decode(ids[: j + 1])): j for j, t in enumerate(ids) if t == close_id}
    out: list[CallTokens | None] = []
    for call in calls:
        i = opens.get(call.start)
        if i is None:
            out.append(None)
            continue
        j = closes.get(call.end)
        out.append(CallTokens(i, i + 1, j + 1 if j is not None and j > i else len(ids)))
    return out

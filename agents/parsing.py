"""Parsing one assistant turn: ``<think>…</think>``, then one hermes/Qwen ``<tool_call>{json}</tool_call>``
or a final answer.

Two layers, both pure:

- :func:`parse_turn_text` reads the decoded text and says what the turn *is* (answer, a valid call,
  or a malformed call with a model-facing error message);
- :func:`locate_call_tokens` finds the call's token span in the turn's ids (the ``<tool_call>`` /
  ``</tool_call>`` tokens are single added tokens in Qwen tokenizers; we never re-tokenise text).

Rules (grounded in the bugs filed against vLLM's hermes parser):

- a ``<tool_call>`` inside ``<think>…</think>`` is a draft, not a call;
- the call body is read with ``json.JSONDecoder.raw_decode``, so a ``</tool_call>`` inside a JSON
  string argument does not end the call early;
- ``arguments`` may be double-encoded as a JSON string (decoded once more here; the env's dispatcher
  tolerates it too);
- malformed: bad JSON, no ``name``, arguments not an object, an unknown tool, two calls in one turn,
  text after ``</tool_call>``, or a call with no ``</tool_call>`` (cut by the token limit).
  A malformed call is still a tool call (it counts as tool use); the model sees ``error``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

__all__ = [
    "TurnKind",
    "ParsedTurn",
    "CallTokens",
    "parse_turn_text",
    "locate_call_tokens",
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
    """Exactly one well-formed call to a known tool, nothing after it."""
    MALFORMED_CALL = "malformed_call"
    """A call was opened but cannot be executed; ``error`` says why (shown to the model)."""


@dataclass(frozen=True)
class ParsedTurn:
    kind: TurnKind
    thinking: str = ""
    """The text inside ``<think>…</think>`` (empty when absent)."""
    answer: str = ""
    """For an answer turn: the text after ``</think>`` (stripped)."""
    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: str = ""
    think_closed: bool = True
    """False when ``<think>`` was opened and never closed (the whole turn is reasoning)."""


def _split_think(text: str) -> tuple[str, str, bool]:
    """``(thinking, rest, closed)``. A turn may omit ``<think>`` (Qwen3 templates pre-open it)."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        if THINK_OPEN in text:
            return text.split(THINK_OPEN, 1)[1], "", False
        return "", text, True
    head = text[:close]
    thinking = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
    return thinking.strip(), text[close + len(THINK_CLOSE) :], True


def _malformed(thinking: str, message: str, name: str = "") -> ParsedTurn:
    return ParsedTurn(TurnKind.MALFORMED_CALL, thinking=thinking, name=name, error=message)


def parse_turn_text(text: str, tool_names: Collection[str]) -> ParsedTurn:
    """What one assistant turn is. ``text`` is the turn decoded without special tokens' removal
    of the agent tokens (``<think>``, ``<tool_call>`` survive ``skip_special_tokens``)."""
    thinking, rest, closed = _split_think(text)
    if not closed:
        return ParsedTurn(TurnKind.ANSWER, thinking=thinking.strip(), answer="", think_closed=False)
    open_at = rest.find(CALL_OPEN)
    if open_at < 0:
        return ParsedTurn(TurnKind.ANSWER, thinking=thinking, answer=rest.strip())
    body = rest[open_at + len(CALL_OPEN) :]
    stripped = body.lstrip()
    try:
        payload, consumed = json.JSONDecoder().raw_decode(stripped)
    except ValueError as exc:
        if CALL_CLOSE not in body:
            return _malformed(thinking, f"the tool call is not closed with {CALL_CLOSE}")
        return _malformed(thinking, f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})")
    after = stripped[consumed:]
    tail = after.lstrip()
    if not tail.startswith(CALL_CLOSE):
        if not tail:
            return _malformed(thinking, f"the tool call is not closed with {CALL_CLOSE}")
        return _malformed(thinking, f"unexpected text after the JSON object of the tool call: {tail[:40]!r}")
    trailing = tail[len(CALL_CLOSE) :].strip()
    if not isinstance(payload, dict):
        return _malformed(thinking, f"the tool call must be a JSON object, got {type(payload).__name__}")
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return _malformed(thinking, 'the tool call has no "name" string')
    if trailing.startswith(CALL_OPEN):
        return _malformed(thinking, "only one tool call per turn is allowed", name)
    if trailing:
        return _malformed(thinking, f"unexpected text after {CALL_CLOSE}: {trailing[:40]!r}", name)
    arguments: Any = payload.get("arguments", {})
    if isinstance(arguments, str):  # double-encoded arguments (a known model/parser bug)
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return _malformed(thinking, "the tool call's arguments are a string that is not valid JSON", name)
    if not isinstance(arguments, dict):
        return _malformed(thinking, f'"arguments" must be a JSON object, got {type(arguments).__name__}', name)
    if name not in tool_names:
        return _malformed(thinking, f"unknown tool {name!r}; available tools: {sorted(tool_names)}", name)
    return ParsedTurn(TurnKind.TOOL_CALL, thinking=thinking, name=name, arguments=arguments)


@dataclass(frozen=True)
class CallTokens:
    """Token positions (within the turn's ids) of one call: ``[open, body)`` is ``<tool_call>``,
    ``[body, end)`` the content up to and including ``</tool_call>`` (or to the turn's end)."""

    open: int
    body: int
    end: int


def locate_call_tokens(
    turn_ids: Sequence[int], *, open_id: int, close_id: int, think_close_id: int | None, search_from: int = 0
) -> CallTokens | None:
    """The first ``<tool_call>`` token after the reasoning, and its closing token.

    ``search_from`` skips tokens already known (not) to be part of the reasoning. Returns None when
    the turn has no ``<tool_call>`` token after ``</think>``.
    """
    ids = list(turn_ids)
    start = search_from
    if think_close_id is not None and think_close_id in ids:
        start = max(start, ids.index(think_close_id) + 1)
    try:
        open_at = ids.index(open_id, start)
    except ValueError:
        return None
    # The last closing token, not the first: a ``</tool_call>`` inside a JSON string argument
    # (when the engine did not stop there) belongs to the call's content.
    closes = [i for i in range(open_at + 1, len(ids)) if ids[i] == close_id]
    end = closes[-1] + 1 if closes else len(ids)
    return CallTokens(open_at, open_at + 1, end)

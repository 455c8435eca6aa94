"""The turn parser: hermes/Qwen tool calls, and the malformed cases vLLM's parser bugs taught us."""

from __future__ import annotations

import pytest

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from axpo_rllm.agents.parsing import TurnKind, locate_calls, parse_turn_text

TOOLS = {"crop", "python"}


def test_answer_after_thinking():
    turn = parse_turn_text("<think>\nthe square is red\n</think>\nThe answer is \\boxed{A}", TOOLS)
    assert turn.kind is TurnKind.ANSWER
    assert turn.thinking == "the square is red"
    assert turn.answer == "The answer is \\boxed{A}"


def test_valid_call():
    turn = parse_turn_text('<think>zoom</think>\n<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 10, 10]}}\n</tool_call>', TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and turn.name == "crop"
    assert turn.arguments == {"bbox": [0, 0, 10, 10]}


def test_close_tag_inside_a_string_argument_does_not_end_the_call():
    text = '<tool_call>{"name": "python", "arguments": {"code": "print(\'</tool_call>\')"}}</tool_call>'
    turn = parse_turn_text(text, TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL
    assert turn.arguments["code"] == "print('</tool_call>')"


def test_double_encoded_arguments_are_decoded():
    turn = parse_turn_text('<tool_call>{"name": "crop", "arguments": "{\\"bbox\\": [1, 2, 3, 4]}"}</tool_call>', TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and turn.arguments == {"bbox": [1, 2, 3, 4]}


def test_draft_call_inside_thinking_is_not_a_call():
    turn = parse_turn_text('<think>maybe <tool_call>{"name": "crop"}</tool_call>? no.</think>\\boxed{B}', TOOLS)
    assert turn.kind is TurnKind.ANSWER and turn.answer == "\\boxed{B}"


def test_unclosed_thinking_is_reasoning_only():
    turn = parse_turn_text("<think>still thinking <tool_call>", TOOLS)
    assert turn.kind is TurnKind.ANSWER and not turn.think_closed and turn.answer == ""


@pytest.mark.parametrize(
    "text, needle",
    [
        ('<tool_call>{"name": "crop", "arguments": {"bbox": [0, 0,}}</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "zoom", "arguments": {}}</tool_call>', "unknown tool 'zoom'"),
        ('<tool_call>{"name": "crop", "arguments": {"bbox": [NaN, 0, 1, 1]}}</tool_call>', "NaN is not valid JSON"),
        ('<tool_call>{"name": "crop", "arguments": {"scale": Infinity}}</tool_call>', "Infinity is not valid JSON"),
        ('<tool_call>{"name": "crop", "arguments": "{\\"x\\": -Infinity}"}</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "crop", "arguments": {"bbox": [1, 2', "not closed"),
        ('<tool_call>{"name": "crop", "arguments": {}}', "not closed"),
        ('<tool_call>{"name": "crop", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name"'),
        ('<tool_call>[1, 2]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "crop", "arguments": {}} x</tool_call>', "unexpected text after the JSON"),
    ],
)
def test_malformed_calls_carry_a_model_facing_error(text, needle):
    turn = parse_turn_text(text, TOOLS)
    assert turn.kind is TurnKind.MALFORMED_CALL
    assert needle in turn.error


def test_parallel_calls_are_all_returned_in_order():
    text = ('<think>two crops</think>\n<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 5, 5]}}\n</tool_call>\n'
            '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>')
    turn = parse_turn_text(text, TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and [c.name for c in turn.calls] == ["crop", "python"]
    assert [c.arguments for c in turn.calls] == [{"bbox": [0, 0, 5, 5]}, {"code": "print(1)"}]
    assert all(text[c.start:].startswith("<tool_call>") and text[: c.end].endswith("</tool_call>") for c in turn.calls)


def test_one_malformed_call_among_valid_ones_is_reported_with_its_own_error():
    turn = parse_turn_text('<tool_call>{"name": "zoom", "arguments": {}}</tool_call><tool_call>{"name": "crop", "arguments": {}}</tool_call>', TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL
    assert [(c.valid, c.name) for c in turn.calls] == [(False, "zoom"), (True, "crop")] and "unknown tool 'zoom'" in turn.error


def test_prose_after_the_closing_tag_is_ignored():
    turn = parse_turn_text('<tool_call>{"name": "crop", "arguments": {}}</tool_call> and then the answer is 3', TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and turn.name == "crop" and turn.answer == ""


@pytest.mark.parametrize("literal", ["<think>", "</think>", "<tool_call>", "</tool_call>", "<think></think><tool_call>"])
def test_literal_tags_inside_a_json_string_argument_are_the_argument(literal):
    code = f"print('{literal}')"
    for prefix in ("", "<think>plan</think>\n"):
        turn = parse_turn_text(prefix + "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>", TOOLS)
        assert turn.kind is TurnKind.TOOL_CALL and len(turn.calls) == 1 and turn.arguments == {"code": code}, (prefix, literal)


@pytest.mark.parametrize("fence", ["```\n{call}\n```", "```json\n{call}\n```", "`{call}`"])
def test_a_call_shown_in_markdown_code_is_not_executed(fence):
    call = '<tool_call>{"name": "crop", "arguments": {}}</tool_call>'
    turn = parse_turn_text("I would write " + fence.format(call=call) + " but the answer is \\boxed{4}", TOOLS)
    assert turn.kind is TurnKind.ANSWER and turn.calls == () and turn.answer.endswith("\\boxed{4}")


def test_a_pre_opened_think_makes_the_turn_start_in_the_reasoning():
    """Qwen3-*-Thinking: the generation prompt ends with <think>, so the turn has only the closer."""
    call = '<tool_call>{"name": "crop", "arguments": {}}</tool_call>'
    drafted = parse_turn_text(f"maybe {call}", TOOLS, think_open=True)
    assert drafted.kind is TurnKind.ANSWER and not drafted.think_closed, "still reasoning: a draft"
    turn = parse_turn_text(f"maybe {call}, yes.\n</think>\n\n{call}", TOOLS, think_open=True)
    assert turn.kind is TurnKind.TOOL_CALL and len(turn.calls) == 1 and turn.thinking.startswith("maybe")


def test_locate_calls_maps_text_spans_to_the_call_tokens():
    OPEN, CLOSE, THINK_END, EOS = 7, 8, 9, 10
    pieces = {1: "a", 2: "b", 3: "c", 4: '{"name": "crop", "arguments": {}}', 5: " x", OPEN: "<tool_call>", CLOSE: "</tool_call>",
              THINK_END: "</think>", EOS: ""}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    ids = [1, OPEN, 4, CLOSE, THINK_END, 3, OPEN, 4, CLOSE, 5, OPEN, 4, CLOSE, EOS]
    turn = parse_turn_text(decode(ids), TOOLS)
    assert [c.name for c in turn.calls] == ["crop", "crop"], "the one before </think> is a draft"
    spans = locate_calls(ids, turn.calls, open_id=OPEN, close_id=CLOSE, decode=decode)
    assert [(s.open, s.body, s.end) for s in spans] == [(6, 7, 9), (10, 11, 13)]
    cut = [1, OPEN, 4]
    (unclosed,) = locate_calls(cut, parse_turn_text(decode(cut), TOOLS).calls, open_id=OPEN, close_id=CLOSE, decode=decode)
    assert (unclosed.open, unclosed.body, unclosed.end) == (1, 2, 3)
    written = [1, 3]  # the text names a call, the ids hold no <tool_call> token
    pieces[3] = '<tool_call>{"name": "crop", "arguments": {}}</tool_call>'
    assert locate_calls(written, parse_turn_text(decode(written), TOOLS).calls, open_id=OPEN, close_id=CLOSE, decode=decode) == [None]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(args=st.dictionaries(st.text(max_size=8), _json_values, max_size=4), prose=st.text(max_size=20).filter(lambda t: "<" not in t and "`" not in t))
def test_any_json_arguments_round_trip_through_one_call(args, prose):
    text = f"{prose}<tool_call>{json.dumps({'name': 'python', 'arguments': args})}</tool_call>{prose}"
    turn = parse_turn_text(text, TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and len(turn.calls) == 1 and turn.arguments == args


_PIECES = list("<>/{}[]\\\"`:,x ") + ["<think>", "</think>", "<tool_call>", "</tool_call>", '"name"', "crop"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
def test_the_parser_never_raises(text):
    turn = parse_turn_text(text, TOOLS)
    for call in turn.calls:
        assert 0 <= call.start < call.end <= len(text) and (call.valid or call.error)

"""The turn parser: hermes/Qwen tool calls, and the malformed cases vLLM's parser bugs taught us."""

from __future__ import annotations

import pytest

from axpo_rllm.agents.parsing import TurnKind, locate_call_tokens, parse_turn_text

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
        ('<tool_call>{"name": "crop", "arguments": {}}</tool_call>\n<tool_call>{"name": "crop", "arguments": {}}</tool_call>', "only one tool call"),
        ('<tool_call>{"name": "crop", "arguments": {}}</tool_call> and then the answer is 3', "unexpected text after"),
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


def test_locate_call_tokens_skips_reasoning_and_takes_the_last_close():
    OPEN, CLOSE, THINK_END = 7, 8, 9
    ids = [1, OPEN, 2, CLOSE, THINK_END, 3, OPEN, 4, CLOSE, 5, CLOSE]
    loc = locate_call_tokens(ids, open_id=OPEN, close_id=CLOSE, think_close_id=THINK_END)
    assert (loc.open, loc.body, loc.end) == (6, 7, 11)
    unterminated = locate_call_tokens([OPEN, 4, 4], open_id=OPEN, close_id=CLOSE, think_close_id=THINK_END)
    assert (unterminated.open, unterminated.body, unterminated.end) == (0, 1, 3)
    assert locate_call_tokens([1, 2], open_id=OPEN, close_id=CLOSE, think_close_id=None) is None

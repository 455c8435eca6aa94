"""Synthetic rollouts: hand-written examples for tests and random steps for benchmarks.

Token ids here are arbitrary integers (no tokenizer): the algorithm only reads masks, spans,
log-probs and rewards. ``TOOL_OPEN`` / ``TOOL_CLOSE`` stand for ``<tool_call>`` / ``</tool_call>``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from axpo_rllm.core.records import QuestionGroup, Rollout, RolloutKind, Termination, ToolCallSpan

__all__ = ["make_rollout", "make_continuation", "random_step", "TOOL_OPEN", "TOOL_CLOSE"]

TOOL_OPEN, TOOL_CLOSE = 7, 8


def make_rollout(
    rollout_id: str,
    question_id: str,
    *,
    correct: bool,
    think: int = 4,
    call_body: Sequence[float] | None = None,
    observation: int = 3,
    tail: int = 3,
    prompt: Sequence[int] = (1, 2, 3),
    reasoning_logprob: float = -0.1,
    termination: Termination = Termination.ANSWER,
) -> Rollout:
    """One rollout: ``think`` reasoning tokens, then either an answer of ``tail`` tokens, or (when
    ``call_body`` holds the call tokens' probabilities) ``<tool_call>`` + the body (its last token is
    ``</tool_call>``) + ``observation`` tokens + ``tail`` answer tokens."""
    ids = list(range(100, 100 + think))
    mask = [1] * think
    logprobs = [reasoning_logprob] * think
    calls = ()
    if call_body is not None:
        open_at = len(ids)
        body = [200 + i for i in range(len(call_body) - 1)] + [TOOL_CLOSE]
        ids += [TOOL_OPEN] + body
        mask += [1] * (1 + len(body))
        logprobs += [-0.05] + [float(np.log(p)) for p in call_body]
        calls = (ToolCallSpan(open_at, open_at + 1, open_at + 1 + len(body), turn=0, name="crop"),)
        ids += list(range(300, 300 + observation))
        mask += [0] * observation
        logprobs += [0.0] * observation
    answer_start = len(ids)
    ids += list(range(400, 400 + tail))
    mask += [1] * tail
    logprobs += [-0.2] * tail
    return Rollout(
        rollout_id=rollout_id,
        question_id=question_id,
        prompt_ids=prompt,
        response_ids=ids,
        response_mask=mask,
        response_logprobs=logprobs,
        tool_calls=calls,
        reward=float(correct),
        correct=correct,
        termination=termination,
        turns=2 if calls else 1,
        answer_start=answer_start,
    )


def make_continuation(source: Rollout, cut: int, index: int, *, correct: bool, new_tokens: int = 5) -> Rollout:
    """A continuation of ``source`` from ``response_ids[:cut]``: the prefix copied token for token,
    then ``new_tokens`` fresh model tokens."""
    ids = np.concatenate([source.response_ids[:cut], np.arange(500, 500 + new_tokens) + index])
    mask = np.concatenate([source.response_mask[:cut], np.ones(new_tokens, dtype=np.int8)])
    logprobs = np.concatenate([source.response_logprobs[:cut], np.full(new_tokens, -0.3, dtype=np.float32)])
    return Rollout(
        rollout_id=f"{source.rollout_id}/c{index}",
        question_id=source.question_id,
        prompt_ids=source.prompt_ids,
        response_ids=ids,
        response_mask=mask,
        response_logprobs=logprobs,
        tool_calls=(),
        reward=float(correct),
        correct=correct,
        termination=Termination.ANSWER,
        turns=2,
        kind=RolloutKind.CONTINUATION,
        source_id=source.rollout_id,
        prefix_len=cut,
    )


def random_step(
    num_questions: int,
    group_size: int,
    *,
    max_response: int = 4096,
    tool_rate: float = 0.3,
    all_wrong_rate: float = 0.4,
    accuracy: float = 0.5,
    seed: int = 0,
) -> list[QuestionGroup]:
    """A random step shaped like the paper's GRPO symptoms: ``tool_rate`` of rollouts call a tool,
    and about ``all_wrong_rate`` of questions with tool users have them all wrong."""
    rng = np.random.default_rng(seed)
    groups = []
    for q in range(num_questions):
        qid = f"q{q}"
        uses_tool = rng.random(group_size) < tool_rate
        all_wrong = rng.random() < all_wrong_rate
        rollouts = []
        for i in range(group_size):
            correct = bool(rng.random() < accuracy) and not (all_wrong and uses_tool[i])
            rollouts.append(random_rollout(rng, f"{qid}-{i}", qid, bool(uses_tool[i]), correct, max_response))
        groups.append(QuestionGroup(qid, tuple(rollouts)))
    return groups


def random_rollout(rng: np.random.Generator, rid: str, qid: str, tool: bool, correct: bool, max_response: int) -> Rollout:
    n = int(rng.integers(max_response // 4, max_response + 1))
    ids = rng.integers(10, 50_000, size=n)
    mask = np.ones(n, dtype=np.int8)
    logprobs = -rng.exponential(0.5, size=n).astype(np.float32)
    calls = ()
    if tool:
        open_at = int(rng.integers(1, n // 2))
        end = min(n - 2, open_at + 1 + int(rng.integers(8, 64)))
        calls = (ToolCallSpan(open_at, open_at + 1, end, turn=0, name="python"),)
        mask[end : min(n - 1, end + int(rng.integers(16, 256)))] = 0
        logprobs[mask == 0] = 0.0
    return Rollout(
        rollout_id=rid,
        question_id=qid,
        prompt_ids=rng.integers(10, 50_000, size=int(rng.integers(64, 512))),
        response_ids=ids,
        response_mask=mask,
        response_logprobs=logprobs,
        tool_calls=calls,
        reward=float(correct),
        correct=correct,
        termination=Termination.ANSWER,
        turns=2 if tool else 1,
        answer_start=n - 1,
    )

"""The typed records every layer of axpo-rllm speaks.

One module, small frozen dataclasses, a docstring per field saying what it means and who fills
it (the model is rllm's ``types.py``). The data flow is a straight line::

    Task -> Rollout (N per question) -> QuestionGroup -> ResamplePlan (ResampleJob ...)
         -> Rollout (continuations) -> TrainingRow -> verl DataProto

A record is complete when it leaves the layer that makes it: there are no optional fields that
only some paths fill. Token positions are always indices into ``response_ids`` (the tokens after
the prompt), half-open ``[start, end)``.

Token-level fields are numpy arrays (ids int64, masks int8, log-probs float32) so that a step of
B*N rollouts of thousands of tokens is planned and padded without Python loops over tokens; the
constructors accept any sequence. Frozen records compare by identity (``eq=False``): two rollouts
are the same rollout, not two equal token sequences.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Task",
    "ToolCallSpan",
    "Termination",
    "RolloutKind",
    "Rollout",
    "QuestionGroup",
    "ResampleJob",
    "Candidate",
    "ResamplePlan",
    "LossSegment",
    "RowRole",
    "TrainingRow",
    "RecordError",
    "rollouts_by_id",
]


class RecordError(ValueError):
    """A record was built from inconsistent values (the message names the value and what was expected)."""


@dataclass(frozen=True)
class Task:
    """One question of the dataset, as the environment and the agent see it."""

    task_id: str
    """Stable id, unique in the dataset; must not contain ':' (rllm builds uids as ``task_id:idx``)."""
    question: str
    """The user-facing question text (without the image placeholders)."""
    answer: str
    """Ground truth, as the verifier of ``data_source`` expects it."""
    data_source: str
    """Selects the verifier (``math``, ``choice``, ``numeric``, ``search_qa``, ...)."""
    images: tuple[Any, ...] = ()
    """The task's images (``PIL.Image.Image`` objects or paths), in prompt order."""
    metadata: dict = field(default_factory=dict)
    """Free-form extras carried through unchanged (choices, tolerance, benchmark name ...)."""

    def __post_init__(self) -> None:
        if ":" in self.task_id:
            raise RecordError(f"task_id {self.task_id!r} contains ':'; rllm uses ':' to build uids")


@dataclass(frozen=True)
class ToolCallSpan:
    """Where one tool call sits in a rollout's ``response_ids`` (filled by the agent).

    ``open_start <= body_start <= end``: ``[open_start, body_start)`` are the token(s) that open the
    call (``<tool_call>``), ``[body_start, end)`` the call's content up to and including the
    closing ``</tool_call>``. AXPO's ``prefix_len`` is the first call's ``body_start`` (docs/algorithm.md §2)
    and its confidence c_s is the mean probability over ``[body_start, end)`` (§3).
    """

    open_start: int
    body_start: int
    end: int
    turn: int
    """0-based assistant turn the call was made in."""
    name: str = ""
    """Tool name as parsed (empty when the call was malformed)."""
    valid: bool = True
    """False when the call could not be parsed or named an unknown tool (it still counts as tool use)."""

    def __post_init__(self) -> None:
        if not (0 <= self.open_start < self.body_start <= self.end):
            raise RecordError(
                "tool call span must satisfy 0 <= open_start < body_start <= end, got "
                f"open_start={self.open_start}, body_start={self.body_start}, end={self.end}"
            )


class Termination(str, enum.Enum):
    """Why a rollout stopped (filled by the agent / workflow)."""

    ANSWER = "answer"
    """The model gave a final answer."""
    MAX_TURNS = "max_turns"
    """The turn cap was reached (with the cap policy ``force_answer`` the last turn was forced)."""
    OVER_TURN = "over_turn"
    """The cap was reached under the ``mask`` policy: the rollout is kept but masked (Mini-o3)."""
    MAX_TOKENS = "max_tokens"
    """The response or context length budget ran out."""
    ERROR = "error"
    """The engine or the env failed; the reason is in ``Rollout.error``."""


class RolloutKind(str, enum.Enum):
    ORIGINAL = "original"
    """One of the N rollouts drawn from the question (phase 1)."""
    CONTINUATION = "continuation"
    """One of the K continuations drawn from a source prefix (phase 3)."""


@dataclass(frozen=True, eq=False)
class Rollout:
    """One multi-turn episode, token-exact (filled by the agent; rewards by the verifier).

    ``response_ids`` is every token after the prompt: the model's turns and the observations the
    environment fed back (chat-template glue included), in order. ``response_mask[i]`` is 1 for a
    token the model sampled and 0 for an observation token. ``response_logprobs[i]`` is the rollout
    policy's log-probability of a model token (0.0 for observation tokens).
    """

    rollout_id: str
    """Unique in the step."""
    question_id: str
    """The question's group id (all N originals and their continuations share it)."""
    prompt_ids: np.ndarray
    """The rendered first prompt: system, tools block, user turn with one unexpanded image pad per image."""
    response_ids: np.ndarray
    response_mask: np.ndarray
    response_logprobs: np.ndarray
    tool_calls: tuple[ToolCallSpan, ...]
    """Every tool call of the rollout, in order (valid or not)."""
    reward: float
    correct: bool
    termination: Termination
    turns: int
    """Number of assistant turns taken."""
    images: tuple[Any, ...] = ()
    """Every image the rollout's tokens refer to, in token order (task images, then tool outputs)."""
    image_offsets: tuple[int, ...] = ()
    """One per image: index in ``response_ids`` of its image pad, -1 for an image of the prompt."""
    answer_start: int = -1
    """Index of the first token of the final answer segment (after ``</think>``), -1 if none.
    Used by the ``no_tool`` resampling ablation (prefix = reasoning up to the answer)."""
    kind: RolloutKind = RolloutKind.ORIGINAL
    source_id: str = ""
    """For a continuation: the ``rollout_id`` of the source rollout; empty otherwise."""
    prefix_len: int = 0
    """For a continuation: number of ``response_ids`` copied from the source prefix (the planner's
    cut index); 0 otherwise."""
    error: str = ""
    """Why the rollout ended in ``Termination.ERROR`` (empty otherwise)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the token fields once, at construction
        set_(self, "prompt_ids", np.asarray(self.prompt_ids, dtype=np.int64).reshape(-1))
        set_(self, "response_ids", np.asarray(self.response_ids, dtype=np.int64).reshape(-1))
        set_(self, "response_mask", np.asarray(self.response_mask, dtype=np.int8).reshape(-1))
        set_(self, "response_logprobs", np.asarray(self.response_logprobs, dtype=np.float32).reshape(-1))
        set_(self, "termination", Termination(self.termination))
        set_(self, "kind", RolloutKind(self.kind))
        set_(self, "tool_calls", tuple(self.tool_calls))
        set_(self, "images", tuple(self.images))
        set_(self, "image_offsets", tuple(int(o) for o in self.image_offsets))
        self._validate()

    def _validate(self) -> None:
        rid, n = self.rollout_id, len(self.response_ids)
        if len(self.response_mask) != n or len(self.response_logprobs) != n:
            raise RecordError(
                f"rollout {rid}: response_ids ({n}), response_mask ({len(self.response_mask)}) and "
                f"response_logprobs ({len(self.response_logprobs)}) must have the same length"
            )
        if n and not np.isin(self.response_mask, (0, 1)).all():
            raise RecordError(f"rollout {rid}: response_mask must hold only 0 and 1")
        if n and (np.isnan(self.response_logprobs).any() or (self.response_logprobs > 1e-4).any()):
            raise RecordError(f"rollout {rid}: response_logprobs must be log-probabilities (<= 0, not NaN)")
        for span in self.tool_calls:
            if span.end > n:
                raise RecordError(
                    f"rollout {rid}: tool call span [{span.open_start}, {span.end}) lies outside the "
                    f"response of {n} tokens"
                )
            if not self.response_mask[span.open_start : span.end].all():
                raise RecordError(
                    f"rollout {rid}: tool call span [{span.open_start}, {span.end}) covers observation "
                    "tokens; a call is made of model tokens only"
                )
        if len(self.image_offsets) != len(self.images):
            raise RecordError(
                f"rollout {rid}: {len(self.images)} images but {len(self.image_offsets)} image_offsets"
            )
        if any(not (-1 <= o < n) for o in self.image_offsets) or list(self.image_offsets) != sorted(self.image_offsets):
            raise RecordError(f"rollout {rid}: image_offsets {self.image_offsets} must be sorted within [-1, {n})")
        if not (-1 <= self.answer_start <= n):
            raise RecordError(f"rollout {rid}: answer_start {self.answer_start} outside [-1, {n}]")
        if self.kind is RolloutKind.CONTINUATION:
            if not self.source_id:
                raise RecordError(f"continuation {rid} has no source_id")
            if not (0 <= self.prefix_len <= n):
                raise RecordError(f"continuation {rid}: prefix_len {self.prefix_len} outside [0, {n}]")
        elif self.prefix_len or self.source_id:
            raise RecordError(f"original rollout {rid} must not have source_id/prefix_len")

    @property
    def used_tool(self) -> bool:
        """u = 1 when the rollout made at least one tool call (docs/algorithm.md 'Setting')."""
        return bool(self.tool_calls)

    @property
    def first_tool_call(self) -> ToolCallSpan | None:
        return self.tool_calls[0] if self.tool_calls else None

    def images_before(self, prefix_len: int) -> tuple[Any, ...]:
        """The images that ``prompt_ids + response_ids[:prefix_len]`` refer to (prompt images included)."""
        return tuple(img for img, off in zip(self.images, self.image_offsets) if off < prefix_len)


@dataclass(frozen=True)
class QuestionGroup:
    """The N original rollouts of one question (filled by the workflow after phase 1)."""

    question_id: str
    rollouts: tuple[Rollout, ...]

    def __post_init__(self) -> None:
        if not self.rollouts:
            raise RecordError(f"question group {self.question_id} is empty")
        for r in self.rollouts:
            if r.question_id != self.question_id:
                raise RecordError(
                    f"rollout {r.rollout_id} has question_id {r.question_id!r}, expected {self.question_id!r}"
                )
            if r.kind is not RolloutKind.ORIGINAL:
                raise RecordError(f"question group {self.question_id} holds continuation {r.rollout_id}")
        ids = [r.rollout_id for r in self.rollouts]
        if len(set(ids)) != len(ids):
            raise RecordError(f"question group {self.question_id} repeats a rollout_id")

    @functools.cached_property
    def tool_subgroup(self) -> tuple[Rollout, ...]:
        """T_q: the tool-using rollouts of the question."""
        return tuple(r for r in self.rollouts if r.used_tool)

    @functools.cached_property
    def no_tool_subgroup(self) -> tuple[Rollout, ...]:
        return tuple(r for r in self.rollouts if not r.used_tool)


@dataclass(frozen=True, eq=False)
class ResampleJob:
    """One selected prefix and the K continuations to draw from it (filled by the planner).

    The continuation request's prompt is exactly ``prompt_ids + prefix_ids`` with ``images``:
    token-exact, never re-rendered text (docs/algorithm.md §2).
    """

    job_id: str
    question_id: str
    source_id: str
    """``rollout_id`` of the source rollout the planner selected."""
    prompt_ids: np.ndarray
    prefix_ids: np.ndarray
    """The source's ``response_ids[:prefix_len]``; empty when ``prefix_fix`` is off (fresh rollouts)."""
    prefix_mask: np.ndarray
    prefix_logprobs: np.ndarray
    images: tuple[Any, ...]
    """Images referenced by ``prompt_ids + prefix_ids`` (task images plus earlier tool outputs)."""
    k: int
    confidence: float
    """c_s: mean probability of the source's tool-call tokens (§3; higher = more certain)."""
    round: int
    """Breadth-first round (0-based) in which the planner picked this prefix."""
    turns_used: int
    """Assistant turns already opened inside the prefix; continuations keep the same turn cap."""

    @property
    def prefix_len(self) -> int:
        """The cut index in the source's ``response_ids`` (0 with ``prefix_fix`` off)."""
        return len(self.prefix_ids)

    @property
    def request_ids(self) -> np.ndarray:
        """The token ids a continuation request sends: prompt + prefix, exactly."""
        return np.concatenate([self.prompt_ids, self.prefix_ids])


@dataclass(frozen=True)
class Candidate:
    """A prefix the planner could resample (one per eligible source rollout)."""

    question_id: str
    source_id: str
    prefix_len: int
    """Where the source would be cut (:func:`axpo_rllm.core.planner.prefix_len`)."""
    confidence: float
    """c_s (§3; higher = more certain)."""
    rank_key: float
    """What the ranking sorts by, ascending (c for ``uncertainty``, -c for ``confidence``, a draw for ``random``)."""


@dataclass(frozen=True)
class ResamplePlan:
    """The planner's decision for one step (docs/algorithm.md §4), with what it saw."""

    budget: int
    """E = floor(r * B * N)."""
    jobs: tuple[ResampleJob, ...]
    triggered: tuple[str, ...]
    """Question ids whose trigger fired (§1), in input order."""
    candidates: tuple[Candidate, ...]
    """Every candidate prefix of the triggered questions, selected or not."""

    @property
    def used(self) -> int:
        """Extra samples the plan spends (sum of K over the selected prefixes)."""
        return sum(j.k for j in self.jobs)


class RowRole(str, enum.Enum):
    ORDINARY = "ordinary"
    """A rollout trained with plain GRPO."""
    SOURCE_PREFIX = "source_prefix"
    """A selected source: its prefix tokens carry A^prefix; its own continuation is masked (default)."""
    CONTINUATION = "continuation"
    """A resampled continuation: prefix masked, continuation tokens carry A^res."""


class LossSegment(NamedTuple):
    """Tokens ``[start, end)`` of a row's response that reach the loss with one advantage
    (model tokens only: observation tokens inside the window stay masked). A tuple: a step makes
    thousands of them."""

    start: int
    end: int
    advantage: float


@dataclass(frozen=True, eq=False)
class TrainingRow:
    """One row of the training batch (filled by the group builder, docs/algorithm.md §6).

    The loss mask is ``rollout.response_mask`` restricted to the union of ``segments``; the
    per-token advantage is each segment's advantage on its tokens and 0 elsewhere.
    ``axpo_rllm.core.advantages.token_arrays`` pads a list of rows into (bs, R) tensors.
    """

    rollout: Rollout
    role: RowRole
    adv_group: str
    """The group this row is normalised in (verl's ``uid``)."""
    score: float
    """The reward this row contributes to its group's statistics (r_prefix for a credited source)."""
    segments: tuple[LossSegment, ...]
    """Disjoint, sorted windows of the response that reach the loss (empty: fully masked row)."""

    def __post_init__(self) -> None:
        n, last = len(self.rollout.response_ids), 0
        for start, end, _ in self.segments:
            if not (last <= start <= end <= n):
                raise RecordError(
                    f"row {self.rollout.rollout_id}: segments must be sorted, disjoint windows of "
                    f"[0, {n}), got {self.segments}"
                )
            last = end


def rollouts_by_id(rollouts: Sequence[Rollout]) -> dict[str, Rollout]:
    """Index rollouts by id; a repeated id is an error (it would silently merge two episodes)."""
    out: dict[str, Rollout] = {}
    for r in rollouts:
        if r.rollout_id in out:
            raise RecordError(f"rollout_id {r.rollout_id!r} appears twice")
        out[r.rollout_id] = r
    return out

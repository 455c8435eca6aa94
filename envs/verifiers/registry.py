"""Which verifier grades which data source: the one table, for the graders and the data layer.

Three parts: :data:`VERIFIERS` (a registered name or dataset alias -> its verifier),
:data:`ANSWER_KINDS` (an answer kind -> the registered verifier grading it) and
:data:`BENCHMARKS` (the paper's data sets, by normalised name or prefix -> their answer kind).
``axpo_rllm.data.sources`` resolves a row's kind from these (overrides and row labels first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from .graders import verify_choice, verify_math, verify_numeric, verify_search_qa
from .results import VerifyResult


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


ANSWER_KINDS: Mapping[str, str] = {
    "math": "math",  # symbolic equivalence (math-verify)
    "choice": "choice",  # the option letter (or the option's text)
    "numeric": "numeric",  # a number within tolerance
    "em": "search_qa",  # normalised exact match against any alias
    "f1": "search_qa",  # the same grader, token F1 as reward (``reward: f1`` in the metadata)
}
"""Answer kind -> the registered verifier that grades it."""

BENCHMARKS: Mapping[str, str] = {
    # RL / SFT training sets the paper draws from
    "virl": "math",  # ViRL39K: boxed answers (letters for its choice questions, which math-verify compares too)
    "fvqa": "em",  # FVQA (MMSearch-R1's search training set): short facts, exact match
    "pyvision": "math",  # PyVision-RL
    "mmfinereason": "math",
    # benchmarks
    "mathvision": "math",  # choice rows carry `options` and become choice rows
    "dynamath": "math",  # rows carry answer_type: multiple choice / float / free-form
    "mathvr": "math",
    "vstar": "choice",  # V*: options in the question, letter answers
    "visualprobe": "em",
    "hrbench": "choice",  # HR-Bench 4K / 8K: A-D columns
    "mmsearch": "f1",
}
"""Normalised benchmark name (or prefix) -> answer kind; a user adds one with ``--verifier NAME=KIND``."""


def kind_of_verifier(spec: VerifierSpec) -> str | None:
    """The first answer kind graded by ``spec``'s function (``search_qa`` -> ``em``), or None."""
    for kind, name in ANSWER_KINDS.items():
        if VERIFIERS[name].fn is spec.fn:
            return kind
    return None


def get_verifier(data_source: str) -> VerifierSpec:
    """The verifier of ``data_source`` (case-insensitive; ``org/name`` also tries ``name``)."""
    key = data_source.lower()
    if key in VERIFIERS:
        return VERIFIERS[key]
    if "/" in key and key.rsplit("/", 1)[1] in VERIFIERS:
        return VERIFIERS[key.rsplit("/", 1)[1]]
    raise KeyError(f"no verifier for data_source {data_source!r}; registered: {sorted(VERIFIERS)}")

"""The data_source -> verifier table: which verifier grades a row of each data source."""

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


def get_verifier(data_source: str) -> VerifierSpec:
    """The verifier of ``data_source`` (case-insensitive; ``org/name`` also tries ``name``)."""
    key = data_source.lower()
    if key in VERIFIERS:
        return VERIFIERS[key]
    if "/" in key and key.rsplit("/", 1)[1] in VERIFIERS:
        return VERIFIERS[key.rsplit("/", 1)[1]]
    raise KeyError(f"no verifier for data_source {data_source!r}; registered: {sorted(VERIFIERS)}")

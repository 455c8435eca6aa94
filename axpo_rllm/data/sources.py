"""Which verifier grades which row: ``data_source`` -> answer kind -> the grader's data source.

An answer kind is how a gold answer is compared with the model's final answer:

======== ============================================= ==================================
kind     compared by                                   graded as (``envs.verifiers``)
======== ============================================= ==================================
math     symbolic equivalence (math-verify)            ``math``
choice   the option letter (or the option's text)      ``choice`` + ``metadata["choices"]``
numeric  a number within tolerance                     ``numeric``
em       normalised exact match against any alias      ``search_qa``
f1       token F1 as reward, exact match as correct    ``search_qa`` + ``reward: f1``
======== ============================================= ==================================

Any name registered with :func:`axpo_rllm.envs.verifiers.register_verifier` is accepted as a kind
too (graded by that verifier). The tables (kind -> grader, benchmark -> kind, alias -> verifier)
are ``axpo_rllm.envs.verifiers.registry``'s; this module resolves a row with them.
:data:`BENCHMARKS` maps the data sets of the paper to their kind by normalised name
(``"HR-Bench 8K"`` -> ``hrbench8k``, matched by the known prefix ``hrbench``).
A row may name its own kind (``answer_type``: DynaMath's ``multiple choice`` / ``float`` /
``free-form``, MathVista's ``question_type`` ...), and a row with options is a choice row.
Precedence, first wins: the user's override for the source, the row's own answer type, options
on the row, the source's kind. A source that resolves to nothing is a bad row, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from axpo_rllm.envs.verifiers import VERIFIERS, get_verifier
from axpo_rllm.envs.verifiers.registry import ANSWER_KINDS, BENCHMARKS, kind_of_verifier

__all__ = [
    "KINDS",
    "BENCHMARKS",
    "ANSWER_TYPES",
    "Resolution",
    "VerifierMap",
    "normalize_source",
    "grader_source",
    "parse_overrides",
]

KINDS = tuple(ANSWER_KINDS)

ANSWER_TYPES: Mapping[str, str | None] = {
    "multiple_choice": "choice", "multi_choice": "choice", "multichoice": "choice", "choice": "choice", "mcq": "choice", "mc": "choice",
    "float": "numeric", "integer": "numeric", "int": "numeric", "number": "numeric", "numeric": "numeric", "numerical": "numeric",
    "math": "math", "expression": "math", "latex": "math", "formula": "math",
    "em": "em", "exact": "em", "exact_match": "em", "text": "em", "short_answer": "em",
    "f1": "f1",
    # free-form answers keep the source's kind (math for MathVision/DynaMath, em for a QA set)
    "free_form": None, "freeform": None, "open": None, "open_ended": None,
}
"""A row's own ``answer_type`` -> kind (labels compared lower case, ``-`` and spaces as ``_``:
``multiple choice``, ``multi-choice``, ``free-form``); None keeps the source's kind."""


def _answer_label(text: str) -> str:
    return re.sub(r"[\s-]+", "_", str(text).strip().lower())


def normalize_source(name: str) -> str:
    """``"lmms-lab/HR-Bench 8K"`` -> ``hrbench8k``, ``"V*"`` -> ``vstar``: lower case, the part after
    the last ``/``, ``*`` spelled ``star``, only letters and digits kept."""
    text = str(name).strip().lower().rsplit("/", 1)[-1].replace("*", "star")
    return re.sub(r"[^a-z0-9]", "", text)


def grader_source(kind: str) -> str:
    """The ``data_source`` :class:`~axpo_rllm.envs.verifiers.Grader` grades a ``kind`` under."""
    return ANSWER_KINDS.get(kind, kind)


def _check_kind(kind: str, where: str) -> str:
    kind = str(kind).strip().lower()
    if kind in KINDS:
        return kind
    try:
        get_verifier(kind)
    except KeyError:
        raise ValueError(f"{where}: unknown answer kind {kind!r}; expected one of {list(KINDS)} or a registered verifier "
                         f"({', '.join(sorted(VERIFIERS))})") from None
    return kind


@dataclass(frozen=True)
class Resolution:
    """How one ``data_source`` resolved (what ``axpo-rllm data inspect`` prints)."""

    source: str
    kind: str
    how: str
    """``override``, ``benchmark``, ``benchmark prefix <key>`` or ``registered verifier``."""


@dataclass
class VerifierMap:
    """``data_source`` -> answer kind, with the user's overrides first (``--verifier NAME=KIND``).

    An override key is matched like a benchmark name (normalised); ``*`` applies to every source.
    """

    overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.overrides = {("*" if k == "*" else normalize_source(k)): _check_kind(v, f"--verifier {k}={v}")
                          for k, v in dict(self.overrides).items()}

    def override(self, source: str) -> str | None:
        return self.overrides.get(normalize_source(source), self.overrides.get("*"))

    def resolve(self, source: str) -> Resolution:
        """The source's kind; raises ``KeyError`` (naming the known names) when nothing matches."""
        forced = self.override(source)
        if forced is not None:
            return Resolution(source, forced, "override")
        key = normalize_source(source)
        if key in BENCHMARKS:
            return Resolution(source, BENCHMARKS[key], "benchmark")
        prefixes = [b for b in BENCHMARKS if key.startswith(b)]
        if prefixes:
            best = max(prefixes, key=len)
            return Resolution(source, BENCHMARKS[best], f"benchmark prefix {best}")
        try:
            spec = get_verifier(str(source))
        except KeyError:
            raise KeyError(
                f"unknown data_source {source!r}: not a benchmark of the paper ({', '.join(sorted(BENCHMARKS))}) nor a "
                f"registered verifier; map it with --verifier {source}=KIND (KIND: {', '.join(KINDS)})"
            ) from None
        return Resolution(source, kind_of_verifier(spec) or str(source).lower(), "registered verifier")

    def row_kind(self, source: str, answer_type: str | None, has_choices: bool) -> tuple[str, str]:
        """``(kind, how)`` for one row (the module docstring's precedence)."""
        forced = self.override(source)
        if forced is not None:
            return forced, "override"
        if answer_type is not None and str(answer_type).strip():
            label = _answer_label(answer_type)
            if label not in ANSWER_TYPES:
                raise ValueError(f"unknown answer kind {answer_type!r} (answer_type); known: {', '.join(sorted(ANSWER_TYPES))}")
            kind = ANSWER_TYPES[label]
            if kind is not None:
                return kind, "row answer_type"
        if has_choices:
            return "choice", "row options"
        resolved = self.resolve(source)
        return resolved.kind, resolved.how


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["vstar=choice", "*=em"]`` -> ``{"vstar": "choice", "*": "em"}``; a malformed item is an error."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, kind = str(item).partition("=")
        if not sep or not name.strip() or not kind.strip():
            raise ValueError(f"--verifier expects NAME=KIND (e.g. vstar=choice), got {item!r}")
        out[name.strip()] = kind.strip()
    return out

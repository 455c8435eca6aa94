"""Answer checking by data source: final-answer extraction, verifiers, and a grader that never zeroes silently.

A task's ``data_source`` picks its verifier from :data:`VERIFIERS` (``math``, ``choice``,
``numeric``, ``search_qa`` and their dataset aliases). :class:`Grader` runs it and turns every
way grading can go wrong (a timeout, a crash, an unparseable gold answer) into reward 0 **plus**
a counted, logged failure in :class:`GraderStats`: a silent zero would look exactly like a wrong
answer and quietly poison the RL signal (users' top complaint: graders zeroing rewards in workers).

Math uses math-verify with its own ``signal.alarm`` timeouts switched off (they raise or score 0
in threads and Ray workers, docs/upstream.md §5); the deadline comes from running the check in a
worker *process* (:class:`DeadlinePool`) that is killed when it overruns, since a thread stuck in
sympy cannot be stopped.

Model output is untrusted text: a final answer is read from a marker (``\\boxed{}``, ``<answer>``,
``Answer:``) or, without one, from the final answer text after ``</think>`` (math through
math-verify's own extraction, the usual multiple-choice forms, the last number, the whole text for
QA), and never from part of a token (see "Final-answer extraction" below). Conventions: a percent
``X%`` matches ``X`` and ``X/100`` (math-verify's, for a percent it recognises; two percents compare
as numbers), in gold and answer alike and however it is written (``50%``, ``50\\%``, ``50 percent``);
numbers take thousands separators, currency, units and scientific notation; a matrix is its values
whatever its environment (``pmatrix``, ``bmatrix``, ``Bmatrix``, ``smallmatrix``, starred forms);
markdown emphasis around an answer (``**C**``, ``*42*``, ``_42_``) is not part of it; a short
answer in a few words of prose whose one number carries a unit ("It is 12 cm long.") is graded on
that number when the gold is a number.

The package, one idea per module: :mod:`.answers` (where a final answer is read from),
:mod:`.numbers`, :mod:`.choices` and :mod:`.math_answers` (reading each kind of answer),
:mod:`.graders` (one verifier per kind), :mod:`.registry` (data_source -> verifier),
:mod:`.deadline` (the killable worker pool), :mod:`.grader` (:class:`Grader`, :func:`compute_score`),
:mod:`.results` (the verdict and the failure counts).
"""


from __future__ import annotations

from .answers import extract_boxed, extract_final_answer, final_answer_text, normalize_text, token_f1
from .choices import extract_choice
from .deadline import DeadlinePool, GraderCrash, GraderTimeout
from .grader import Grader, compute_score
from .graders import verify_choice, verify_math, verify_numeric, verify_search_qa
from .numbers import parse_number
from .registry import VERIFIERS, VerifierSpec, get_verifier, register_verifier
from .results import GRADER_STATS, GraderStats, VerifyResult

__all__ = [
    "VerifyResult",
    "GraderStats",
    "Grader",
    "GraderTimeout",
    "GraderCrash",
    "DeadlinePool",
    "VerifierSpec",
    "VERIFIERS",
    "register_verifier",
    "get_verifier",
    "extract_boxed",
    "extract_final_answer",
    "final_answer_text",
    "extract_choice",
    "parse_number",
    "normalize_text",
    "token_f1",
    "verify_math",
    "verify_choice",
    "verify_numeric",
    "verify_search_qa",
    "GRADER_STATS",
    "compute_score",
]

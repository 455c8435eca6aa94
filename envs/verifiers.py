"""Answer checking by data source: final-answer extraction, verifiers, and a grader that never zeroes silently.

A task's ``data_source`` picks its verifier from :data:`VERIFIERS` (``math``, ``choice``,
``numeric``, ``search_qa`` and their dataset aliases). :class:`Grader` runs it and turns every
way grading can go wrong (a timeout, a crash, an unparseable gold answer) into reward 0 **plus**
a counted, logged failure in :class:`GraderStats`: a silent zero would look exactly like a wrong
answer and quietly poison the RL signal (users' top complaint: graders zeroing rewards in workers).

Math uses math-verify with its own ``signal.alarm`` timeouts switched off (they raise or score 0
in threads and Ray workers, FIELD_NOTES §5); the deadline comes from running the check in a
worker *process* (:class:`DeadlinePool`) that is killed when it overruns, since a thread stuck in
sympy cannot be stopped.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import math
import os
import pickle
import re
import select
import string
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

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

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on one final answer."""

    reward: float
    """What the rollout is credited with (0 on a grader failure)."""
    correct: bool
    extracted: str | None = None
    """The final answer as read from the response (None: the response gave none)."""
    failure: str | None = None
    """Why grading failed (``timeout: ...``, ``crash: ...``); None when the grader ran to completion."""

    @classmethod
    def failed(cls, failure: str, extracted: str | None = None) -> "VerifyResult":
        return cls(reward=0.0, correct=False, extracted=extracted, failure=failure)


class GraderStats:
    """Thread-safe counters of grading calls and failures (by kind and by data source).

    Exposed so the trainer can log ``grader/failures`` every step: a rising count means rewards are
    being zeroed by the grader, not earned by the policy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._failures: Counter[tuple[str, str]] = Counter()

    def record(self, data_source: str, failure: str | None) -> None:
        with self._lock:
            self._calls[data_source] += 1
            if failure is not None:
                self._failures[(data_source, failure.split(":", 1)[0])] += 1

    @property
    def calls(self) -> int:
        with self._lock:
            return sum(self._calls.values())

    @property
    def failures(self) -> int:
        with self._lock:
            return sum(self._failures.values())

    def snapshot(self) -> dict:
        """``{"calls", "failures", "failures_by_kind", "failures_by_source"}``, for logging."""
        with self._lock:
            by_kind: Counter[str] = Counter()
            by_source: Counter[str] = Counter()
            for (source, kind), n in self._failures.items():
                by_kind[kind] += n
                by_source[source] += n
            return {
                "calls": sum(self._calls.values()),
                "failures": sum(self._failures.values()),
                "failures_by_kind": dict(by_kind),
                "failures_by_source": dict(by_source),
            }

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._failures.clear()


GRADER_STATS = GraderStats()
"""The process-wide counters every :class:`Grader` uses unless given its own."""


# --------------------------------------------------------------------------------------------
# Final-answer extraction


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``; escaped braces (``\\{``) do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{}``, or ``\\boxed 5``), nested braces kept."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _balanced_group(text, end)
            if content is not None:
                return content.strip()
        else:  # "\boxed 5$": the argument is the next token
            token = re.match(r"[^\s$]+", text[end:])
            if token:
                return token.group(0)
    return None


_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is\s*[:：]?|[:：])\s*(.+)",
    re.IGNORECASE,
)


def _clean_answer(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^\*\*|\*\*$", "", text).strip().rstrip(".").strip()  # markdown bold, full stop
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


def extract_final_answer(response: str) -> str | None:
    """The model's final answer: the last ``\\boxed{}``, else ``<answer>...</answer>``, else an ``Answer:`` line.

    Only text after the last ``</think>`` counts: a draft answer inside the reasoning is not the
    answer. Returns None when the response commits to no answer.
    """
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG_RE.findall(response)
    if tags:
        inner = tags[-1]
        return extract_boxed(inner) or _clean_answer(inner) or None
    lines = _ANSWER_LINE_RE.findall(response)
    if lines:
        return _clean_answer(lines[-1].splitlines()[0]) or None
    return None


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.casefold()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_text(prediction).split(), normalize_text(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if not pred_tokens or not gold_tokens or common == 0:
        return float(pred_tokens == gold_tokens)
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Numbers and choices


_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}")
_NUMBER_RE = re.compile(r"[-+−]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*(?:\d+(?:\.\d*)?|\.\d+))?")


def parse_number(text: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` of the first number in ``text``; None if there is none.

    Accepts thousands separators (``1,234``), ``$``, fractions (``3/4``, ``\\frac{3}{4}``),
    scientific notation and a trailing ``%`` / ``\\%``.
    """
    text = text.replace("\\!", "").replace("\\,", "").replace("−", "-")
    frac = _FRAC_RE.search(text)
    if frac:
        sign = -1.0 if frac.group(1) else 1.0
        try:
            return sign * float(frac.group(2)) / float(frac.group(3)), False
        except (ValueError, ZeroDivisionError):
            return None
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    match = _NUMBER_RE.search(text)
    if not match:
        return None
    token = match.group(0).replace(" ", "").replace("+", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            value = float(num) / float(den)
        else:
            value = float(token)
    except (ValueError, ZeroDivisionError):
        return None
    is_percent = bool(re.match(r"\s*\\?%", text[match.end() :]))
    return value, is_percent


def _candidates(parsed: tuple[float, bool]) -> tuple[float, ...]:
    """A percent may be meant as a number or a fraction: ``50%`` stands for 50 and for 0.5."""
    value, is_percent = parsed
    return (value, value / 100.0) if is_percent else (value,)


_LETTERS = string.ascii_uppercase


def _choice_texts(metadata: Mapping) -> dict[str, str]:
    """``{letter: option text}`` from ``metadata["choices"]`` (a list, or a dict keyed by letter)."""
    choices = metadata.get("choices") or metadata.get("options") or []
    if isinstance(choices, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in choices.items()}
    return {_LETTERS[i]: str(c) for i, c in enumerate(choices)}


def extract_choice(answer: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The option letter an answer names: ``B``, ``(B)``, ``B. red``, ``option B``, or an option's text."""
    text = _clean_answer(answer)
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text).strip()
    match = re.fullmatch(r"\(?([A-Za-z])\)?", text) or re.match(r"\(?([A-Z])[\).:](?:\s|$)", text)
    if match is None:
        match = re.search(r"\b(?:option|choice)\s*\(?([A-Z])\)?\b", text, re.IGNORECASE)
    if match is not None:
        return match.group(1).upper()
    if choices:
        wanted = normalize_text(text)
        for letter, option in choices.items():
            if normalize_text(option) == wanted:
                return letter
    return None


# --------------------------------------------------------------------------------------------
# Verifiers: (response, answer, metadata) -> VerifyResult. Pure; failures are the Grader's job.


def _as_latex(text: str) -> str:
    """Inline-math delimiters around a bare answer (math-verify reads ``\\%`` inside ``$..$``, not inside ``\\boxed{}``)."""
    return text if "$" in text else f"${text}$"


def _math_verify_equal(gold: str, prediction: str) -> bool:
    """math-verify with its signal-based timeouts off (the caller bounds the time).

    Conventions are math-verify's own: ``50\\%`` matches ``50``; ``\\frac{1}{2}`` matches ``0.5``;
    ``x=2`` matches ``2``; sets are unordered; ``1,000`` is one thousand.
    """
    from math_verify import parse, verify  # heavy (sympy): loaded in the grader worker process only

    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} could not be parsed by math-verify")
    pred_parsed = parse(_as_latex(prediction), parsing_timeout=None)
    if not pred_parsed:
        return False  # the model's answer is not maths: wrong, not a grader failure
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True))


def verify_math(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Symbolic equivalence of the final answer and the gold answer (math-verify)."""
    extracted = extract_final_answer(response)
    if extracted is None:
        return VerifyResult(0.0, False, None)
    correct = _math_verify_equal(answer, extracted)
    return VerifyResult(float(correct), correct, extracted)


def verify_choice(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Multiple choice: the answer may be given as a letter or as the option's text."""
    extracted = extract_final_answer(response)
    if extracted is None:
        return VerifyResult(0.0, False, None)
    choices = _choice_texts(metadata)
    gold = extract_choice(answer, choices)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} names no option of {sorted(choices) or 'A-Z'}")
    correct = extract_choice(extracted, choices) == gold
    return VerifyResult(float(correct), correct, extracted)


def verify_numeric(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """|pred - gold| <= max(abs_tol, rel_tol * |gold|); ``metadata`` may set ``rel_tol``/``abs_tol``.

    Defaults are near-exact (rel 1e-6); datasets with "relaxed accuracy" (ChartQA: 5%) set their own.
    """
    extracted = extract_final_answer(response)
    if extracted is None:
        return VerifyResult(0.0, False, None)
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} holds no number")
    pred = parse_number(extracted)
    if pred is None:
        return VerifyResult(0.0, False, extracted)
    rel_tol = float(metadata.get("rel_tol", 1e-6))
    abs_tol = float(metadata.get("abs_tol", metadata.get("tolerance", 1e-9)))
    correct = any(math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol) for p in _candidates(pred) for g in _candidates(gold))
    return VerifyResult(float(correct), correct, extracted)


def _gold_aliases(answer: str, metadata: Mapping) -> list[str]:
    """The gold answer plus ``metadata["aliases"]``; a JSON list in ``answer`` counts as aliases too."""
    aliases: list[str] = []
    stripped = answer.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
            if isinstance(parsed, list):
                aliases.extend(str(a) for a in parsed)
        except json.JSONDecodeError:
            pass
    if not aliases:
        aliases.append(answer)
    aliases.extend(str(a) for a in metadata.get("aliases", ()))
    return aliases


def verify_search_qa(response: str, answer: str, metadata: Mapping) -> VerifyResult:
    """Normalised exact match against any alias; ``metadata["reward"] == "f1"`` credits token F1 instead."""
    extracted = extract_final_answer(response)
    if extracted is None:
        return VerifyResult(0.0, False, None)
    aliases = _gold_aliases(answer, metadata)
    exact = any(normalize_text(extracted) == normalize_text(a) for a in aliases)
    if metadata.get("reward", "em") == "f1":
        return VerifyResult(max(token_f1(extracted, a) for a in aliases), exact, extracted)
    return VerifyResult(float(exact), exact, extracted)


# --------------------------------------------------------------------------------------------
# Registry


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


# --------------------------------------------------------------------------------------------
# Deadline-bounded execution in worker processes


class GraderTimeout(Exception):
    pass


class GraderCrash(Exception):
    pass


def _write_frame(stream, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise EOFError("grader worker closed its pipe")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_raw_frame(stream) -> bytes:
    (length,) = struct.unpack(">I", _read_exact(stream, 4))
    return _read_exact(stream, length)


def _read_frame(stream) -> Any:
    return pickle.loads(_read_raw_frame(stream))


def _serve(warmup: tuple[str, ...]) -> None:
    """Worker main loop (runs in the child): import heavy modules once, then answer ``(fn, args)`` frames.

    The child talks over its stdin/stdout pipes; fd 1 is pointed at stderr first so that a stray
    ``print`` in a verifier cannot corrupt the protocol.
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    for module in warmup:
        try:
            importlib.import_module(module)
        except Exception:  # a missing optional module shows up as a crash of the job that needs it
            pass
    _write_frame(out, "ready")
    while True:
        try:
            raw = _read_raw_frame(inp)
        except EOFError:
            return
        try:
            job = pickle.loads(raw)
            if job is None:
                return
            fn, args = job
            reply = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - everything (an unloadable job too) goes back as a crash
            reply = (False, f"{type(e).__name__}: {e}")
        _write_frame(out, reply)


class _Worker:
    """One grader subprocess.

    A plain ``subprocess`` rather than ``multiprocessing``: spawn/forkserver re-import the
    parent's ``__main__`` (a training script without a main guard would run again), and fork is
    unsafe in a process that runs threads (rllm's env executor, Ray).
    """

    def __init__(self, warmup: tuple[str, ...], startup_timeout_s: float) -> None:
        code = (
            "import sys; sys.path[:0] = " + repr([p for p in sys.path if p]) + "; "
            "from axpo_rllm.envs.verifiers import _serve; _serve(" + repr(tuple(warmup)) + ")"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        try:
            ready = self._receive(startup_timeout_s)
        except (GraderTimeout, EOFError) as e:
            self.kill()
            raise GraderCrash(f"grader worker did not start within {startup_timeout_s:g}s ({e})") from None
        if ready != "ready":
            self.kill()
            raise GraderCrash(f"grader worker sent {ready!r} instead of 'ready'")

    def _receive(self, timeout_s: float) -> Any:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not readable:
            raise GraderTimeout(f"no verdict within {timeout_s:g}s")
        return _read_frame(self.process.stdout)

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        _write_frame(self.process.stdin, (fn, args))
        ok, value = self._receive(timeout_s)
        if not ok:
            raise GraderCrash(value)
        return value

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self) -> None:
        try:
            _write_frame(self.process.stdin, None)
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class DeadlinePool:
    """Up to ``size`` warm worker processes; a job that overruns its deadline has its worker killed.

    Workers start on first use and import ``warmup`` modules before taking jobs, so the import time
    of sympy/math-verify never counts against a job's deadline.
    """

    def __init__(self, size: int = 2, warmup: tuple[str, ...] = ("math_verify",), startup_timeout_s: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"DeadlinePool size must be >= 1, got {size}")
        self._warmup = warmup
        self._startup_timeout_s = startup_timeout_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        """``fn(*args)`` in a worker; raises :class:`GraderTimeout` or :class:`GraderCrash`."""
        with self._slots:
            worker = self._take_worker()
            try:
                result = worker.run(fn, args, timeout_s)
            except GraderCrash:
                self._give_back(worker)  # the job raised; the worker itself is fine
                raise
            except GraderTimeout:
                worker.kill()
                raise
            except Exception as e:  # pipe broken, worker died, job not picklable: start afresh next time
                worker.kill()
                raise GraderCrash(f"grader worker failed ({type(e).__name__}: {e})") from None
            except BaseException:
                worker.kill()
                raise
            self._give_back(worker)
            return result

    def _take_worker(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise GraderCrash("DeadlinePool is closed")
            if self._idle:
                return self._idle.pop()
        return _Worker(self._warmup, self._startup_timeout_s)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


_default_pool: DeadlinePool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> DeadlinePool:
    """The process-wide pool (lazily created; sized for the grading load of one trainer process)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = DeadlinePool(size=max(1, min(4, (os.cpu_count() or 2) // 2)))
            atexit.register(_default_pool.close)
        return _default_pool


# --------------------------------------------------------------------------------------------
# The grader


class Grader:
    """Grades final answers by data source; every failure is reward 0 + a counted, logged failure.

    ``timeout_s`` bounds isolated verifiers (math). ``stats`` defaults to :data:`GRADER_STATS`.
    """

    def __init__(self, timeout_s: float = 10.0, stats: GraderStats | None = None, pool: DeadlinePool | None = None) -> None:
        self.timeout_s = timeout_s
        self.stats = stats if stats is not None else GRADER_STATS
        self._pool = pool

    @property
    def pool(self) -> DeadlinePool:
        return self._pool if self._pool is not None else default_pool()

    def grade(self, data_source: str, response: str, answer: str, metadata: Mapping | None = None) -> VerifyResult:
        metadata = metadata or {}
        started = time.perf_counter()
        try:
            spec = get_verifier(data_source)
            if spec.isolated:
                result = self.pool.run(spec.fn, (response, answer, dict(metadata)), self.timeout_s)
            else:
                result = spec.fn(response, answer, metadata)
        except GraderTimeout as e:
            result = VerifyResult.failed(f"timeout: {e}")
        except GraderCrash as e:
            result = VerifyResult.failed(f"crash: {e}")
        except Exception as e:  # noqa: BLE001 - any verifier bug is a counted failure, not a zero
            result = VerifyResult.failed(f"crash: {type(e).__name__}: {e}")
        self.stats.record(data_source, result.failure)
        if result.failure is not None:
            logger.warning(
                "grader failure for data_source=%r after %.2fs: %s (response tail %r)",
                data_source,
                time.perf_counter() - started,
                result.failure,
                response[-120:],
            )
        return result

    def grade_task(self, task: Any, response: str) -> VerifyResult:
        """Grade a :class:`axpo_rllm.core.records.Task`'s final response."""
        return self.grade(task.data_source, response, task.answer, task.metadata)


_shared_grader: Grader | None = None


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None, **kwargs: Any) -> dict:
    """verl's reward-function contract (``custom_reward_function.path: <this file>``, ``name: compute_score``).

    verl's reward loop calls it in an executor thread, the place where ``signal.alarm`` graders
    fail; this one is thread-safe. Returns ``score`` plus ``acc`` and ``grader_failure`` (floats,
    so verl can average them into step metrics). A list ``ground_truth`` is read as aliases.
    """
    global _shared_grader
    if _shared_grader is None:
        _shared_grader = Grader()
    answer = json.dumps(list(ground_truth)) if isinstance(ground_truth, (list, tuple)) else str(ground_truth)
    metadata = extra_info if isinstance(extra_info, Mapping) else {}
    result = _shared_grader.grade(data_source, solution_str, answer, metadata)
    return {"score": result.reward, "acc": float(result.correct), "grader_failure": float(result.failure is not None)}

"""What grading returns: the verdict on one answer, and the counts of every way grading failed."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass


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

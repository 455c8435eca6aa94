"""The grader: runs the data source's verifier and turns every way grading can fail into reward 0
plus a counted, logged failure (never a silent zero)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Mapping

from .deadline import DeadlinePool, GraderCrash, GraderTimeout, default_pool
from .registry import get_verifier
from .results import GRADER_STATS, GraderStats, VerifyResult

logger = logging.getLogger(__name__)


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

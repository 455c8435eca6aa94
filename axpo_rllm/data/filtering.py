"""The paper's RL data filtering, from recorded rollouts (docs/algorithm.md §9).

A question is kept for RL only when it can still teach the policy something: drop it when the SFT
model solves it ``k/k`` (nothing to gain: every GRPO group would be uniform) and when the teacher
fails it ``k/k`` (likely unanswerable or mislabeled). Both decisions read the first ``k`` samples
(by sample index) of a recording, e.g. two ``axpo-rllm eval --n 4`` runs on the training set, one
with the SFT model and one with the teacher. A question with no recorded samples, or fewer than
``k``, is a bad row (an error, or a counted skip): never silently kept or dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from .loaders import DataError, DataRow, LoadReport, reject_or_raise
from .rollouts import Recording, lookup

__all__ = ["FilterReport", "paper_filter"]


@dataclass
class FilterReport:
    k: int
    kept: int = 0
    dropped_sft_solved: int = 0
    """Questions the SFT model solved k/k."""
    dropped_teacher_failed: int = 0
    """Questions the teacher failed k/k (and the SFT model did not solve k/k)."""

    def as_dict(self) -> dict:
        return {"k": self.k, "kept": self.kept, "dropped_sft_solved": self.dropped_sft_solved,
                "dropped_teacher_failed": self.dropped_teacher_failed}

    def summary(self) -> str:
        return (f"kept {self.kept}; dropped {self.dropped_sft_solved} the SFT model solves {self.k}/{self.k} and "
                f"{self.dropped_teacher_failed} the teacher fails {self.k}/{self.k}")


def _first_k(recording: Recording, groups, row: DataRow, k: int, who: str) -> list:
    samples = lookup(groups, row)
    if not samples:
        raise DataError(row.origin, f"no {who} rollouts recorded for {row.source}/{row.task_id} in {recording.path}", f"no {who} rollouts")
    if len(samples) < k:
        raise DataError(row.origin, f"{len(samples)} {who} rollouts recorded for {row.source}/{row.task_id}; the filter reads {k}",
                        f"too few {who} rollouts")
    return samples[:k]


def paper_filter(
    rows: Iterable[DataRow],
    sft: Recording,
    teacher: Recording,
    *,
    k: int = 4,
    skip_bad: bool = False,
    report: LoadReport | None = None,
    filter_report: FilterReport | None = None,
) -> Iterator[DataRow]:
    """The rows to keep; the counts land in ``filter_report`` (and bad rows in ``report`` with ``skip_bad``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    counts = filter_report if filter_report is not None else FilterReport(k)
    sft_groups, teacher_groups = sft.by_question(), teacher.by_question()
    for row in rows:
        try:
            sft_samples = _first_k(sft, sft_groups, row, k, "SFT")
            teacher_samples = _first_k(teacher, teacher_groups, row, k, "teacher")
        except DataError as e:
            reject_or_raise(e, skip_bad, report)
            continue
        if all(s.correct for s in sft_samples):
            counts.dropped_sft_solved += 1
        elif not any(s.correct for s in teacher_samples):
            counts.dropped_teacher_failed += 1
        else:
            counts.kept += 1
            yield row

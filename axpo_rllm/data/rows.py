"""The records of loading a data set: where a row came from (:class:`RowOrigin`), a bad row
(:class:`DataError`), a normalised question (:class:`DataRow`) and what a load kept and skipped
(:class:`LoadReport`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from axpo_rllm.core.records import Task
from axpo_rllm.envs.images import ImageError, ImageInfo, open_image

from .sources import grader_source

__all__ = ["RowOrigin", "DataError", "DataRow", "LoadReport", "reject_or_raise", "image_category"]


@dataclass(frozen=True)
class RowOrigin:
    """Where a row came from: the file and its record index (0-based; jsonl: the line, 1-based)."""

    file: str
    row: int
    unit: str = "row"

    def __str__(self) -> str:
        return f"{self.file}, {self.unit} {self.row}"


class DataError(ValueError):
    """A bad row: the message names the file, the row and what is wrong with it."""

    def __init__(self, origin: RowOrigin | str, reason: str, category: str = "bad row") -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason
        self.category = category


@dataclass(frozen=True)
class DataRow:
    """One question, normalised, images still references (filled by :func:`normalize_row`)."""

    task_id: str
    source: str
    """The benchmark / data set name as the row gives it (per-benchmark scores group by it)."""
    kind: str
    """Answer kind (:mod:`axpo_rllm.data.sources`)."""
    kind_how: str
    """Why that kind: ``override``, ``row answer_type``, ``row options``, ``benchmark`` ..."""
    question: str
    """What the model is asked (``<image>`` placeholders removed; options appended when the text lacks them)."""
    answer: str
    """Gold answer in the verifier's terms (boxed content unwrapped; a JSON list of aliases for em/f1)."""
    choices: tuple[str, ...]
    """Option texts, letters A, B, ... implied; empty unless a choice row."""
    images: tuple[Any, ...]
    """Image references in prompt order (bytes, ``{bytes, path}``, paths, PIL images)."""
    image_info: tuple[ImageInfo, ...]
    """Header-probed size and format of each image (empty when probing was off)."""
    origin: RowOrigin
    image_root: str | None = None
    system_prompt: str | None = None
    """A system message of a verl ``prompt`` (kept for conversion; the agent uses its own)."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Remaining scalar columns and ``extra_info`` keys (tolerances, aliases, categories ...)."""

    @property
    def grader_source(self) -> str:
        return grader_source(self.kind)

    @property
    def grader_metadata(self) -> dict[str, Any]:
        """What the verifier reads: the row's metadata plus ``choices`` and ``reward``."""
        meta = dict(self.metadata)
        if self.choices:
            meta["choices"] = list(self.choices)
        if self.kind == "f1":
            meta["reward"] = "f1"
        return meta

    def task(self) -> Task:
        """The :class:`Task` with decoded images; a corrupt image is a :class:`DataError` naming this row."""
        images = []
        for i, ref in enumerate(self.images):
            try:
                images.append(open_image(ref, self.image_root))
            except ImageError as e:
                raise DataError(self.origin, f"image {i}: {e}", image_category(e)) from None
        meta = self.grader_metadata | {"benchmark": self.source, "answer_kind": self.kind, "origin": str(self.origin)}
        return Task(self.task_id, self.question, self.answer, self.grader_source, tuple(images), meta)


def image_category(error: Exception) -> str:
    """The skip reason of an image that failed to open: missing or corrupt."""
    return "missing image" if "not found" in str(error) else "corrupt image"


@dataclass
class LoadReport:
    """What a load read, kept and skipped (by reason), for ``--skip-bad`` runs and ``inspect``."""

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add_bad(self, error: DataError) -> None:
        self.skipped[error.category] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def reject(self, error: DataError) -> None:
        """A row that loaded but failed a later stage (an image body at write time, a filter's lookup)."""
        self.add_bad(error)
        self.rows_ok -= 1

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"files": list(self.files), "rows_read": self.rows_read, "rows_ok": self.rows_ok,
                "rows_skipped": self.rows_skipped, "skipped_by_reason": dict(self.skipped), "examples": list(self.examples)}

    def summary(self) -> str:
        text = f"{self.rows_ok} of {self.rows_read} rows loaded"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f"; {self.rows_skipped} skipped ({reasons})"
        return text


def reject_or_raise(error: DataError, skip_bad: bool, report: LoadReport | None) -> None:
    """A row that failed after loading: with ``--skip-bad`` counted in ``report`` (when given) and
    skipped; otherwise raised — a bad row is never dropped silently."""
    if not skip_bad:
        raise error
    if report is not None:
        report.reject(error)

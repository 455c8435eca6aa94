"""What ``axpo-rllm data inspect`` counts: rows per data source and answer kind, how each source's
verifier was resolved, images per row, their sizes and formats, and (``decode``) the images that
do not decode. A bad row stops the count, or with ``skip_bad`` lands in the load report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .loaders import DataError, DataRow, LoadReport

__all__ = ["Inspection", "inspect_rows", "percentiles"]


@dataclass
class Inspection:
    per_source: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """data_source -> answer kind -> rows."""
    how: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """data_source -> how its kind was resolved -> rows."""
    kinds: Counter = field(default_factory=Counter)
    images_per_row: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    decode_failures: int = 0

    def add(self, row: DataRow) -> None:
        self.per_source[row.source][row.kind] += 1
        self.how[row.source][row.kind_how] += 1
        self.kinds[row.kind] += 1
        self.images_per_row[len(row.images)] += 1
        for info in row.image_info:
            self.widths.append(info.width)
            self.heights.append(info.height)
            self.formats[info.format] += 1

    def as_dict(self, report: LoadReport) -> dict:
        """The ``--json`` summary."""
        widths, heights = self.widths, self.heights
        return {"report": report.as_dict(), "sources": {s: dict(c) for s, c in self.per_source.items()},
                "verifier_resolution": {s: dict(c) for s, c in self.how.items()}, "answer_kinds": dict(self.kinds),
                "images_per_row": {str(k): v for k, v in self.images_per_row.items()},
                "image_width": widths and [min(widths), max(widths)],
                "image_height": heights and [min(heights), max(heights)],
                "image_formats": dict(self.formats), "decode_failures": self.decode_failures}


def inspect_rows(rows: Iterable[DataRow], *, decode: bool = False, skip_bad: bool = False,
                 report: LoadReport | None = None) -> Inspection:
    """Count ``rows``; ``decode`` also decodes every image (a failure is raised, or counted with ``skip_bad``)."""
    seen = Inspection()
    for row in rows:
        seen.add(row)
        if decode:
            try:
                row.task()
            except DataError as e:
                if not skip_bad:
                    raise
                if report is not None:
                    report.reject(e)
                seen.decode_failures += 1
    return seen


def percentiles(values: list[int]) -> str:
    """``min / median / max`` of image sides (``—`` for none)."""
    if not values:
        return "—"
    lo, mid, hi = np.percentile(values, [0, 50, 100])
    return f"{int(lo)} / {int(mid)} / {int(hi)}"

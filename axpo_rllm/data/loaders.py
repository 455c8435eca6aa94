"""Dataset files in the public formats -> :class:`DataRow` (one question each) -> :class:`~axpo_rllm.core.records.Task`.

The pieces: :mod:`.formats` reads each file format into raw records, :mod:`.columns` normalises a
raw record's columns into a :class:`DataRow`, :mod:`.rows` holds the records (:class:`DataRow`,
:class:`DataError`, :class:`LoadReport`); this module reads whole files with them (and names
them all, as before).

Every row either becomes a complete :class:`DataRow` or raises :class:`DataError` naming the file
and the row. With ``skip_bad`` the error is counted in the :class:`LoadReport` instead; nothing is
dropped without a count. Images are probed (header only) at load; pixels are decoded by
:meth:`DataRow.task`, one question at a time.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from .columns import normalize_row
from .formats import BATCH_ROWS, iter_records
from .rows import DataError, DataRow, LoadReport, RowOrigin, reject_or_raise
from .sources import VerifierMap

__all__ = ["RowOrigin", "DataError", "DataRow", "LoadReport", "iter_records", "normalize_row", "read_rows", "load_rows",
           "BATCH_ROWS", "reject_or_raise"]


def read_rows(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    source: str | None = None,
    verifiers: VerifierMap | None = None,
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    skip_bad: bool = False,
    report: LoadReport | None = None,
    probe_images: bool = True,
) -> Iterator[DataRow]:
    """Every good row of every file, lazily. A bad row raises :class:`DataError`, or with
    ``skip_bad`` is counted in ``report`` (pass one to read the counts). Ids repeated within a
    file are bad rows (the second occurrence)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else LoadReport()
    verifiers = verifiers or VerifierMap()
    for path in paths:
        report.files.append(str(path))
        seen: dict[tuple[str, str], RowOrigin] = {}
        try:
            for origin, raw in iter_records(path, split):
                report.rows_read += 1
                try:
                    if isinstance(raw, DataError):
                        raise raw
                    row = normalize_row(raw, origin, default_source=source, verifiers=verifiers, image_root=image_root,
                                        probe_images=probe_images)
                    key = (row.source, row.task_id)
                    if key in seen:
                        raise DataError(origin, f"duplicate id {row.task_id!r} in {row.source} (first at {seen[key].unit} {seen[key].row})",
                                        "duplicate id")
                    seen[key] = origin
                except DataError as e:
                    if not skip_bad:
                        raise
                    report.add_bad(e)
                    continue
                report.rows_ok += 1
                yield row
        except DataError as e:
            if e.category != "unreadable file" or not skip_bad:
                raise
            report.add_bad(e)


def load_rows(paths, **kwargs) -> tuple[list[DataRow], LoadReport]:
    """:func:`read_rows` into a list, with its report."""
    report = kwargs.pop("report", None) or LoadReport()
    rows = list(read_rows(paths, report=report, **kwargs))
    return rows, report

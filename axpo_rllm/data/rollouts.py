"""Recorded rollouts: the ``samples.jsonl`` that ``axpo-rllm eval`` writes (or any jsonl like it).

One :class:`~axpo_rllm.core.samples.SampleRecord` per line (the record and its rules live there:
at least ``task_id`` and ``correct``; ``messages`` and ``tool_images`` when the evaluation ran
with ``--record``). A folder is read as an ``eval`` output folder: ``samples.jsonl`` beside
``eval_config.json`` (tool schemas, system prompt) and ``images/`` (the images tools returned).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from axpo_rllm.core.samples import SampleRecord

from .formats import jsonl_records
from .rows import DataError, DataRow

__all__ = ["SampleRecord", "Recording", "read_samples", "lookup"]


@dataclass
class Recording:
    """The samples of one file or eval folder, by question."""

    path: str
    samples: list[SampleRecord]
    config: dict = field(default_factory=dict)
    """``eval_config.json`` (empty for a bare jsonl)."""
    images_dir: Path | None = None

    def by_question(self) -> dict[tuple[str | None, str], list[SampleRecord]]:
        out: dict[tuple[str | None, str], list[SampleRecord]] = defaultdict(list)
        for s in self.samples:
            out[(s.benchmark, s.task_id)].append(s)
        for group in out.values():
            group.sort(key=lambda s: s.sample)
        return out


def read_samples(path: str | os.PathLike) -> Recording:
    """A :class:`Recording` of an eval folder or a jsonl file; a bad line is a :class:`DataError` naming it."""
    path = Path(path)
    config: dict = {}
    images_dir = None
    if path.is_dir():
        if (path / "eval_config.json").exists():
            config = json.loads((path / "eval_config.json").read_text())
        images_dir = path / "images"
        path = path / "samples.jsonl"
    if not path.is_file():
        raise DataError(str(path), "no such recording (an `axpo-rllm eval` output folder or a samples .jsonl)", "unreadable file")
    samples = []
    seen_index: dict[tuple[str | None, str], int] = defaultdict(int)
    for origin, data in jsonl_records(path):
        if isinstance(data, DataError):
            raise data
        try:
            sample = SampleRecord.from_dict(data, origin=str(origin))
        except ValueError as e:
            raise DataError(origin, str(e), "invalid record") from None
        key = (sample.benchmark, sample.task_id)
        if "sample" not in data:  # recorded elsewhere: the order of the lines is the index
            sample.sample = seen_index[key]
        seen_index[key] += 1
        samples.append(sample)
    return Recording(str(path), samples, config, images_dir)


def lookup(groups: Mapping[tuple[str | None, str], list[SampleRecord]], row: DataRow) -> list[SampleRecord] | None:
    """The samples recorded for ``row``: by ``(benchmark, task_id)``, else by ``task_id`` for recordings without benchmarks."""
    found = groups.get((row.source, row.task_id))
    return found if found is not None else groups.get((None, row.task_id))

"""Recorded rollouts: the ``samples.jsonl`` that ``axpo-rllm eval`` writes (or any jsonl like it).

One JSON object per line, at least ``task_id`` and ``correct``; ``benchmark`` (the row's
``data_source``) and ``sample`` (its index among the question's samples) when known; ``messages``
and ``tool_images`` when the evaluation ran with ``--record``. A folder is read as an ``eval``
output folder: ``samples.jsonl`` beside ``eval_config.json`` (tool schemas, system prompt) and
``images/`` (the images tools returned). The writer is ``axpo_rllm.train.evaluate.SampleRecord``;
this reader only relies on the fields above, so rollouts recorded elsewhere work too.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .loaders import DataError, DataRow, RowOrigin

__all__ = ["RecordedSample", "Recording", "read_samples", "lookup"]


@dataclass(frozen=True)
class RecordedSample:
    task_id: str
    correct: bool
    benchmark: str | None
    sample: int
    origin: RowOrigin
    termination: str = ""
    malformed_calls: int = 0
    messages: tuple[dict, ...] | None = None
    tool_images: tuple[str, ...] = ()


@dataclass
class Recording:
    """The samples of one file or eval folder, by question."""

    path: str
    samples: list[RecordedSample]
    config: dict = field(default_factory=dict)
    """``eval_config.json`` (empty for a bare jsonl)."""
    images_dir: Path | None = None

    def by_question(self) -> dict[tuple[str | None, str], list[RecordedSample]]:
        out: dict[tuple[str | None, str], list[RecordedSample]] = defaultdict(list)
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
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = RowOrigin(str(path), n, "line")
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(origin, f"invalid JSON: {e}", "invalid record") from None
            if not isinstance(data, dict) or "task_id" not in data or not isinstance(data.get("correct"), bool):
                raise DataError(origin, "a recorded sample needs `task_id` and a boolean `correct`", "invalid record")
            bench = str(data["benchmark"]) if data.get("benchmark") is not None else None
            key = (bench, str(data["task_id"]))
            index = int(data.get("sample", seen_index[key]))
            seen_index[key] += 1
            messages = data.get("messages")
            samples.append(RecordedSample(
                task_id=str(data["task_id"]), correct=data["correct"], benchmark=bench, sample=index, origin=origin,
                termination=str(data.get("termination", "")), malformed_calls=int(data.get("malformed_calls", 0) or 0),
                messages=tuple(messages) if isinstance(messages, list) else None,
                tool_images=tuple(data.get("tool_images") or ()),
            ))
    return Recording(str(path), samples, config, images_dir)


def lookup(groups: Mapping[tuple[str | None, str], list[RecordedSample]], row: DataRow) -> list[RecordedSample] | None:
    """The samples recorded for ``row``: by ``(benchmark, task_id)``, else by ``task_id`` for recordings without benchmarks."""
    found = groups.get((row.source, row.task_id))
    return found if found is not None else groups.get((None, row.task_id))

"""Correct recorded trajectories -> verl multi-turn SFT rows (``axpo-rllm data sft-export``).

A trajectory is an evaluation sample recorded with ``axpo-rllm eval --record`` (typically the
teacher's, on the training set): its assistant and tool turns, and the images its tools returned.
The question and its images come from the data set itself, so a row is exactly what the agent saw::

    messages = [system?] + [user: "<image>"*n + question] + recorded turns
    images   = the question's images + the tool images, in placeholder order
    tools    = the tool schemas of the evaluation (its eval_config.json)

Only correct samples are exported; by default samples with a malformed call are left out too (a
demonstration should not teach a broken call). Each exclusion is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

from axpo_rllm.envs.images import ImageError, image_bytes

from .loaders import DataError, DataRow, LoadReport, reject_or_raise
from .rollouts import Recording, lookup

__all__ = ["ExportReport", "sft_examples"]


@dataclass
class ExportReport:
    exported: int = 0
    questions: int = 0
    """Questions with at least one exported trajectory."""
    left_out: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"exported": self.exported, "questions": self.questions, "left_out": dict(self.left_out)}

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.left_out.most_common())
        return f"exported {self.exported} trajectories of {self.questions} questions" + (f"; left out {why}" if why else "")


def _images(row: DataRow, sample, recording: Recording) -> list[dict]:
    out = []
    for i, ref in enumerate(row.images):
        try:
            out.append({"bytes": image_bytes(ref, row.image_root), "path": None})
        except ImageError as e:
            raise DataError(row.origin, f"image {i}: {e}", "missing image") from None
    for name in sample.tool_images or ():
        path = (recording.images_dir / name) if recording.images_dir is not None else None
        if path is None or not path.is_file():
            raise DataError(sample.origin, f"tool image {name!r} is missing from {recording.images_dir}", "missing image")
        out.append({"bytes": path.read_bytes(), "path": name})
    return out


def sft_examples(
    rows: Iterable[DataRow],
    recording: Recording,
    *,
    tools: Sequence[Mapping] | None = None,
    system_prompt: str | None = None,
    allow_malformed: bool = False,
    max_per_question: int | None = None,
    report: ExportReport | None = None,
    skip_bad: bool = False,
    load_report: LoadReport | None = None,
) -> Iterator[dict]:
    """verl multi-turn SFT rows (:data:`axpo_rllm.data.writers.SFT_COLUMNS`) for the correct samples of ``recording``.

    ``tools`` / ``system_prompt`` default to the recording's ``eval_config.json``.
    """
    counts = report if report is not None else ExportReport()
    config = recording.config
    tools = list(tools if tools is not None else config.get("tool_schemas") or [])
    if system_prompt is None:
        system_prompt = (config.get("agent") or {}).get("system_prompt")
    groups = recording.by_question()
    for row in rows:
        samples = lookup(groups, row) or []
        taken = 0
        try:
            for sample in samples:
                if not sample.correct:
                    counts.left_out["incorrect"] += 1
                    continue
                if sample.malformed_calls and not allow_malformed:
                    counts.left_out["with a malformed call"] += 1
                    continue
                if max_per_question is not None and taken >= max_per_question:
                    counts.left_out["over --max-per-question"] += 1
                    continue
                if sample.messages is None:
                    raise DataError(sample.origin, "the sample has no recorded turns: run `axpo-rllm eval` with --record", "not recorded")
                messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
                messages.append({"role": "user", "content": "<image>" * len(row.images) + row.question})
                messages += [{"role": str(m["role"]), "content": str(m["content"])} for m in sample.messages]
                images = _images(row, sample, recording)
                placeholders = sum(m["content"].count("<image>") for m in messages)
                if placeholders != len(images):
                    raise DataError(sample.origin, f"{placeholders} <image> placeholders but {len(images)} images", "bad trajectory")
                taken += 1
                counts.exported += 1
                yield {"messages": messages, "images": images, "tools": tools, "data_source": row.source,
                       "task_id": row.task_id, "sample": sample.sample}
        except DataError as e:
            reject_or_raise(e, skip_bad, load_report)
            continue
        if taken:
            counts.questions += 1
        elif not samples:
            counts.left_out["questions without recorded samples"] += 1

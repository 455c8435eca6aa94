"""Rows out: verl's RL parquet, rllm dataset rows (and its registry), verl's multi-turn SFT parquet.

**verl RL parquet** (what ``RLHFDataset`` reads): ``data_source`` (the benchmark name, so verl's
validation metrics split by benchmark), ``prompt`` (an optional system message and the user turn,
one ``<image>`` placeholder per image before the question: our agent's prompt order),
``images`` (``{bytes, path}`` structs, the stored bytes copied, not re-encoded), ``ability`` (the
answer kind), ``reward_model`` ``{style: rule, ground_truth}``, ``extra_info`` (index, id, split,
benchmark, answer kind, options, question, answer, the remaining metadata as JSON). The schema is
fixed, so rows with different extras never widen a struct with None-filled fields; verl scores
it with :func:`axpo_rllm.data.reward.compute_score` (``custom_reward_function.path``).

**rllm rows** (``DatasetRegistry.register_dataset``; read back by our rllm workflow through
``task_from_dict``): ``data_source`` is the grader's name (``math``/``choice``/``numeric``/
``search_qa``), ``benchmark`` the data set's.

**verl multi-turn SFT parquet** (``MultiTurnSFTDataset``): ``messages`` (role, content; images as
``<image>`` placeholders in order), ``images``, ``tools`` (OpenAI-style schemas). verl stores
``tools`` as a struct column, and Arrow gives every tool of the list the union of all tools'
parameter fields, so a tool's schema reads back with the other tools' properties set to None
(``read_sft_parquet`` drops them; verl's reader does not).

Every writer writes to a temporary file and renames it at the end: an error leaves no half file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from axpo_rllm.envs.images import ImageError, image_bytes, open_image

from .loaders import BATCH_ROWS, DataError, DataRow, LoadReport, load_rows, reject_or_raise

__all__ = ["verl_row", "write_verl_parquet", "rllm_row", "register_rllm", "register_run_files", "SFT_COLUMNS", "write_sft_parquet", "read_sft_parquet"]


def _verl_schema():
    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([
            ("index", pa.int64()), ("id", pa.string()), ("split", pa.string()), ("benchmark", pa.string()),
            ("answer_kind", pa.string()), ("choices", pa.list_(pa.string())), ("question", pa.string()),
            ("answer", pa.string()), ("metadata_json", pa.string()),
        ])),
    ])  # fmt: skip


def _image_structs(row: DataRow, verify: bool) -> list[dict]:
    out = []
    for i, ref in enumerate(row.images):
        try:
            if verify:
                open_image(ref, row.image_root)  # a corrupt body must not reach a training set
            data = image_bytes(ref, row.image_root)
        except ImageError as e:
            raise DataError(row.origin, f"image {i}: {e}", "missing image" if "not found" in str(e) else "corrupt image") from None
        name = ref.get("path") if isinstance(ref, Mapping) else (os.fspath(ref) if isinstance(ref, (str, os.PathLike)) and len(str(ref)) < 1024 else None)
        out.append({"bytes": data, "path": os.path.basename(name) if name else None})
    return out


def verl_row(row: DataRow, index: int, split: str = "train", verify_images: bool = True) -> dict[str, Any]:
    """One row of verl's RL parquet."""
    prompt = [{"role": "system", "content": row.system_prompt}] if row.system_prompt else []
    prompt.append({"role": "user", "content": "<image>" * len(row.images) + row.question})
    return {
        "data_source": row.source,
        "prompt": prompt,
        "images": _image_structs(row, verify_images),
        "ability": row.kind,
        "reward_model": {"style": "rule", "ground_truth": row.answer},
        "extra_info": {
            "index": index, "id": row.task_id, "split": split, "benchmark": row.source, "answer_kind": row.kind,
            "choices": list(row.choices), "question": row.question, "answer": row.answer,
            "metadata_json": json.dumps(dict(row.metadata), default=str),
        },
    }


def _atomic_parquet(out: str | os.PathLike, schema, batches: Iterable[list[dict]]) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    written = 0
    writer = None
    try:
        for batch in batches:
            if not batch:
                continue
            table = pa.Table.from_pylist(batch, schema=schema)  # schema None: inferred from the first batch
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table)
            written += len(batch)
        if writer is None:  # no rows: still a valid (empty) file with the schema
            writer = pq.ParquetWriter(tmp, schema if schema is not None else pa.schema([]))
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return written


def _batched(rows: Iterable[DataRow], make: Callable[[DataRow, int], dict], skip_bad: bool, report: LoadReport | None):
    batch: list[dict] = []
    index = 0
    for row in rows:
        try:
            batch.append(make(row, index))
        except DataError as e:
            reject_or_raise(e, skip_bad, report)
            continue
        index += 1
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    yield batch


def write_verl_parquet(
    rows: Iterable[DataRow],
    out: str | os.PathLike,
    *,
    split: str = "train",
    verify_images: bool = True,
    skip_bad: bool = False,
    report: LoadReport | None = None,
) -> int:
    """Stream ``rows`` into verl's RL parquet at ``out``; returns the rows written."""
    return _atomic_parquet(out, _verl_schema(), _batched(
        rows, lambda row, i: verl_row(row, i, split, verify_images), skip_bad, report))


def rllm_row(row: DataRow, verify_images: bool = True) -> dict[str, Any]:
    """One rllm dataset row: what ``task_from_dict`` (our rllm workflow) and our rllm evaluator read.

    Empty ``metadata`` is left out: rllm stores a split as parquet, which cannot hold a struct column
    with no fields (every row's metadata empty), and ``task_from_dict`` reads a missing one as empty.
    """
    row_out = {
        "task_id": row.task_id,
        "question": row.question,
        "ground_truth": row.answer,
        "data_source": row.grader_source,
        "benchmark": row.source,
        "answer_kind": row.kind,
        "choices": list(row.choices),
        "images": [s["bytes"] for s in _image_structs(row, verify_images)],
        "reward": "f1" if row.kind == "f1" else "em",
    }
    if row.metadata:
        row_out["metadata"] = dict(row.metadata)
    return row_out


def register_rllm(
    rows: Iterable[DataRow], name: str, split: str = "train", *, description: str = "", verify_images: bool = True,
    skip_bad: bool = False, report: LoadReport | None = None,
) -> int:
    """Register ``rows`` in rllm's ``DatasetRegistry`` (``$RLLM_HOME/datasets``) as ``name``/``split``.

    rllm's API takes the whole list, so the rows (images included) are held in memory once.
    """
    try:
        from rllm.data import DatasetRegistry  # optional: rllm is not on PyPI
    except ImportError as e:
        raise RuntimeError(f"registering in rllm's dataset registry needs rllm installed (https://github.com/rllm-org/rllm): {e}") from None
    data = [r for batch in _batched(rows, lambda row, i: rllm_row(row, verify_images), skip_bad, report) for r in batch]
    if not data:
        raise ValueError(f"no rows to register as rllm dataset {name!r}")
    DatasetRegistry.register_dataset(name, data, split=split, source="axpo-rllm data convert", description=description)
    return len(data)


def register_run_files(cfg: Any, skip_bad: bool = False,
                       reports: dict[str, LoadReport] | None = None) -> tuple[Any, Any]:
    """A run config's ``data.train_files`` / ``data.val_files`` (any format this package reads)
    registered in rllm's dataset registry as ``axpo-<stem>`` and loaded back as rllm datasets;
    (None, None) when the run names registered datasets instead (no such files on disk).

    Every row is read and its images decoded here, before any worker starts: a bad row raises
    :class:`DataError` naming its file and line, or with ``skip_bad`` is counted and left out
    (``reports[key]``: each file list's :class:`LoadReport`)."""
    from omegaconf import OmegaConf
    from rllm.data.dataset import DatasetRegistry  # type: ignore[import-not-found]  # needs rllm

    out = []
    for key, split in (("data.train_files", "train"), ("data.val_files", "test")):
        files = OmegaConf.select(cfg, key, default=None)
        files = [files] if isinstance(files, str) else list(files or [])
        if not files or not all(Path(str(f)).exists() for f in files):
            out.append(None)
            continue
        report = LoadReport()
        rows, _ = load_rows([str(f) for f in files], skip_bad=skip_bad, report=report)
        name = "axpo-" + "-".join(Path(str(f)).stem for f in files)[:64]
        register_rllm(rows, name, split=split, skip_bad=skip_bad, report=report)
        if reports is not None:
            reports[key] = report
        out.append(DatasetRegistry.load_dataset(name, split))
    return (out[0], out[1]) if out[0] is not None else (None, None)


SFT_COLUMNS = ("messages", "images", "tools", "data_source", "task_id", "sample")


def write_sft_parquet(examples: Iterable[Mapping[str, Any]], out: str | os.PathLike) -> int:
    """verl multi-turn SFT rows (``messages``, ``images`` as ``{bytes, path}``, ``tools``, provenance)."""

    def batches():
        batch = []
        for example in examples:
            missing = [c for c in SFT_COLUMNS if c not in example]
            if missing:
                raise ValueError(f"SFT example lacks {missing}")
            batch.append({c: example[c] for c in SFT_COLUMNS})
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
        yield batch

    return _atomic_parquet(out, None, batches())  # the tools struct type depends on the schemas: inferred


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def read_sft_parquet(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of :func:`write_sft_parquet`, with the None fields Arrow added to each tool schema dropped."""
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["tools"] = _drop_none(row["tools"])
    return rows

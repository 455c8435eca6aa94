"""Raw records from each dataset file format (:func:`iter_records`), before any column is read.

Formats, found by suffix (or by the folder's contents):

* **verl RL parquet** — ``prompt`` (chat messages; ``<image>`` placeholders in the user turn),
  ``images`` (``{bytes, path}`` structs, bytes or paths), ``reward_model.ground_truth``,
  ``data_source``, ``extra_info``. Read with pyarrow in record batches (large files stream).
* **plain parquet / Arrow IPC** — the same column spellings as below (Hugging Face parquet shards:
  a folder of ``*.parquet`` is read shard by shard).
* **Hugging Face ``datasets`` saved to disk** (``save_to_disk``; ``Image`` features): read through
  ``datasets`` in Arrow format, so an ``Image`` column arrives as its ``{bytes, path}`` struct and
  nothing is decoded.
* **jsonl** (or a ``.json`` list) + an image folder: paths resolve against ``image_root`` (default:
  the file's folder). **tsv/csv** (VLMEvalKit's HR-Bench/MMBench files): base64 images inline.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .rows import DataError, RowOrigin

__all__ = ["BATCH_ROWS", "iter_records", "jsonl_records"]

BATCH_ROWS = 256
"""Rows per record batch read from parquet / Arrow files (the memory a large file costs at once)."""


def _format_of(path: Path) -> str:
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        return "folder"
    suffix = path.suffix.lower()
    formats = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".tsv": "tsv", ".csv": "csv", ".arrow": "arrow"}
    if suffix not in formats:
        raise DataError(str(path), f"unknown dataset format {suffix!r}; expected one of {sorted(formats)} or a folder", "unreadable file")
    return formats[suffix]


def _parquet_records(path: Path) -> Iterator[dict]:
    try:
        handle = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(str(path), f"not a readable parquet file: {type(e).__name__}: {e}", "unreadable file") from None
    for batch in handle.iter_batches(batch_size=BATCH_ROWS):
        yield from batch.to_pylist()


def _arrow_records(path: Path) -> Iterator[dict]:
    try:
        source = pa.memory_map(str(path))
        try:
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = iter(ipc.open_stream(source))  # `datasets` writes the stream format
    except Exception as e:  # noqa: BLE001
        raise DataError(str(path), f"not a readable Arrow file: {type(e).__name__}: {e}", "unreadable file") from None
    for batch in batches:
        yield from batch.to_pylist()


def _hf_records(path: Path, split: str | None) -> Iterator[dict]:
    try:
        import datasets  # optional (the `data` extra): only Hugging Face folders need it
    except ImportError as e:
        raise DataError(str(path), f"reading a Hugging Face dataset folder needs `datasets` (pip install 'axpo-rllm[data]'): {e}",
                        "unreadable file") from None

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(str(path), f"not a readable Hugging Face dataset: {type(e).__name__}: {e}", "unreadable file") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise DataError(str(path), f"a DatasetDict with splits {sorted(ds)}: choose one with --split", "unreadable file")
            split = next(iter(ds))
        if split not in ds:
            raise DataError(str(path), f"no split {split!r}; splits: {sorted(ds)}", "unreadable file")
        ds = ds[split]
    # Arrow format: Image columns arrive as their {bytes, path} structs, never decoded here.
    for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from table.to_pylist()


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[RowOrigin, dict | DataError]]:
    """Each non-blank line of a JSON-lines file as an object with its origin (``file, line n``); a
    line that is not a JSON object comes as the :class:`DataError` saying so."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = RowOrigin(str(path), line_no, "line")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, DataError(origin, f"invalid JSON: {e}", "invalid record")
                continue
            if not isinstance(record, dict):
                yield origin, DataError(origin, f"a record must be a JSON object, got {type(record).__name__}", "invalid record")
                continue
            yield origin, record


def _json_records(path: Path) -> Iterator[tuple[RowOrigin, dict | DataError]]:
    """A ``.json`` holding one list of records; anything else is read as JSON lines."""
    with open(path, encoding="utf-8") as f:
        head = f.read(64).lstrip()
    if not head.startswith("["):
        yield from jsonl_records(path)
        return
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"invalid JSON: {e}", "unreadable file") from None
    for i, record in enumerate(records):
        origin = RowOrigin(str(path), i)
        if not isinstance(record, dict):
            yield origin, DataError(origin, f"a record must be a JSON object, got {type(record).__name__}", "invalid record")
        else:
            yield origin, record


def _csv_records(path: Path, delimiter: str) -> Iterator[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are one field each
    with open(path, encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f, delimiter=delimiter):
            yield {k: (None if v in ("", "nan", "NaN") else v) for k, v in record.items()}


def iter_records(path: str | os.PathLike, split: str | None = None) -> Iterator[tuple[RowOrigin, dict | DataError]]:
    """Every raw record of a dataset file or folder, lazily, with its origin (errors in place of unreadable records)."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "no such file or folder", "unreadable file")
    fmt = _format_of(path)
    if fmt == "folder":
        shards = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".parquet", ".jsonl", ".arrow") and p.is_file())
        if not shards:
            raise DataError(str(path), "the folder holds no Hugging Face dataset and no .parquet/.jsonl/.arrow files", "unreadable file")
        for shard in shards:
            yield from iter_records(shard, split)
        return
    if fmt in ("jsonl", "json"):
        yield from (jsonl_records(path) if fmt == "jsonl" else _json_records(path))
        return
    records = {
        "parquet": lambda: _parquet_records(path),
        "arrow": lambda: _arrow_records(path),
        "hf": lambda: _hf_records(path, split),
        "tsv": lambda: _csv_records(path, "\t"),
        "csv": lambda: _csv_records(path, ","),
    }[fmt]()
    for i, record in enumerate(records):
        yield RowOrigin(str(path), i), record

"""Dataset files in the public formats -> :class:`DataRow` (one question each) -> :class:`~axpo_rllm.core.records.Task`.

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

Column spellings (first found wins; ``extra_info`` is searched too): question ``prompt`` /
``question`` / ``problem`` / ``query`` / ``instruction``; answer ``reward_model.ground_truth`` /
``ground_truth`` / ``answer`` / ``label`` / ``solution``; images ``images`` / ``image`` /
``decoded_image`` / ``image_path(s)``; options ``options`` / ``choices`` or ``A``..``J`` columns;
answer kind ``answer_kind`` / ``answer_type`` / ``question_type``; id ``id`` / ``task_id`` /
``uid`` / ``pid`` / ``index`` ...; benchmark ``benchmark`` / ``data_source`` (else ``source=``).

Every row either becomes a complete :class:`DataRow` or raises :class:`DataError` naming the file
and the row. With ``skip_bad`` the error is counted in the :class:`LoadReport` instead; nothing is
dropped without a count. Images are probed (header only) at load; pixels are decoded by
:meth:`DataRow.task`, one question at a time.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from axpo_rllm.core.records import Task
from axpo_rllm.envs.images import ImageError, ImageInfo, is_image_ref, open_image, probe_image
from axpo_rllm.envs.verifiers import extract_boxed, extract_choice, parse_number

from .sources import VerifierMap, grader_source

__all__ = ["RowOrigin", "DataError", "DataRow", "LoadReport", "iter_records", "normalize_row", "read_rows", "load_rows", "BATCH_ROWS"]

BATCH_ROWS = 256
"""Rows per record batch read from parquet / Arrow files (the memory a large file costs at once)."""

_LETTERS = "ABCDEFGHIJ"
_ID_KEYS = ("id", "task_id", "uid", "pid", "qid", "question_id", "index", "idx", "sample_index")
_QUESTION_KEYS = ("question", "problem", "query", "instruction", "prompt", "text")
_ANSWER_KEYS = ("ground_truth", "answer", "gt_answer", "gt", "label", "solution")
_IMAGE_KEYS = ("images", "image", "decoded_image", "image_paths", "image_path", "img", "img_path")
_CHOICE_KEYS = ("options", "choices")
_KIND_KEYS = ("answer_kind", "answer_type", "question_type")
_SOURCE_KEYS = ("benchmark", "data_source")
_CONSUMED = set(_ID_KEYS + _QUESTION_KEYS + _ANSWER_KEYS + _IMAGE_KEYS + _CHOICE_KEYS + _KIND_KEYS + _SOURCE_KEYS) | set(_LETTERS) | {
    "reward_model", "extra_info", "ability", "metadata_json", "system_prompt", "metadata",
}
_PLACEHOLDER = "<image>"


# --------------------------------------------------------------------------------------------
# Records


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
                raise DataError(self.origin, f"image {i}: {e}", _image_category(e)) from None
        meta = self.grader_metadata | {"benchmark": self.source, "answer_kind": self.kind, "origin": str(self.origin)}
        return Task(self.task_id, self.question, self.answer, self.grader_source, tuple(images), meta)


def _image_category(error: Exception) -> str:
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


# --------------------------------------------------------------------------------------------
# Raw records from each format


def reject_or_raise(error: DataError, skip_bad: bool, report: LoadReport | None) -> None:
    """A row that failed after loading: with ``--skip-bad`` counted in ``report`` (when given) and
    skipped; otherwise raised — a bad row is never dropped silently."""
    if not skip_bad:
        raise error
    if report is not None:
        report.reject(error)


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


def _jsonl_records(path: Path) -> Iterator[tuple[RowOrigin, dict | DataError]]:
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
        yield from _jsonl_records(path)
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
        yield from (_jsonl_records(path) if fmt == "jsonl" else _json_records(path))
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


# --------------------------------------------------------------------------------------------
# One raw record -> DataRow


def _listish(value: Any) -> list | None:
    """A list from a list, tuple or numpy array (pandas / pyarrow hand back either); None otherwise."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        out = value.tolist()
        return out if isinstance(out, list) else None
    return None


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN from a pandas-written file
        return False
    if isinstance(value, str):
        return bool(value.strip())
    listed = _listish(value)
    return bool(listed) if listed is not None else True


def _first(raw: Mapping, extra: Mapping, keys: Sequence[str]) -> tuple[str | None, Any]:
    for mapping in (raw, extra):
        for key in keys:
            if key in mapping and _present(mapping[key]):
                return key, mapping[key]
    return None, None


def _content_text(content: Any, origin: RowOrigin) -> tuple[str, int]:
    """``(text, images named)`` of a message's content: a string or a list of typed parts."""
    if isinstance(content, str):
        return content, content.count(_PLACEHOLDER)
    parts = _listish(content)
    if parts is None:
        raise DataError(origin, f"prompt message content must be a string or a list of parts, got {type(content).__name__}", "bad prompt")
    texts, images = [], 0
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping):
            if part.get("type") == "image" or part.get("image") is not None or part.get("image_url") is not None:
                images += 1
            elif part.get("text") is not None:
                texts.append(str(part["text"]))
    text = "".join(texts)
    return text, images + text.count(_PLACEHOLDER)


def _question(raw: Mapping, extra: Mapping, origin: RowOrigin) -> tuple[str, int, str | None]:
    """``(question without placeholders, images named in it, system prompt)``."""
    prompt = raw.get("prompt")
    if isinstance(prompt, str) and prompt.lstrip().startswith("[{"):
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            pass
    messages = _listish(prompt)
    system = None
    if messages and all(isinstance(m, Mapping) and "role" in m for m in messages):
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise DataError(origin, f"prompt has no user message (roles {[m.get('role') for m in messages]})", "bad prompt")
        systems = [m for m in messages if m.get("role") == "system"]
        if systems:
            system = _content_text(systems[0].get("content"), origin)[0]
        text, named = _content_text(users[-1].get("content"), origin)
    else:
        key, value = _first(raw, extra, _QUESTION_KEYS)
        if key is None:
            raise DataError(origin, f"no question: none of {list(_QUESTION_KEYS)} (nor a chat `prompt`) is present", "no question")
        text, named = _content_text(value if isinstance(value, str) else str(value), origin)
    text = re.sub(r"[ \t]*<image>[ \t]*\n?", "", text).strip()
    if not text:
        raise DataError(origin, "the question is empty", "no question")
    return text, named, system


def _images(raw: Mapping, extra: Mapping, origin: RowOrigin) -> list[Any]:
    key, value = _first(raw, extra, _IMAGE_KEYS)
    if key is None:
        return []
    listed = _listish(value)
    refs = listed if listed is not None else [value]
    for i, ref in enumerate(refs):
        if not is_image_ref(ref):
            raise DataError(origin, f"{key}[{i}] is not an image reference: {type(ref).__name__} {str(ref)[:60]!r}", "missing image")
    return refs


def _choices(raw: Mapping, extra: Mapping, origin: RowOrigin) -> list[str]:
    key, value = _first(raw, extra, _CHOICE_KEYS)
    if key is not None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataError(origin, f"{key} is a string that is not a JSON list: {value[:80]!r}", "bad options") from None
        if isinstance(value, Mapping):
            letters = sorted(str(k).strip().upper() for k in value)
            if letters != list(_LETTERS[: len(letters)]):
                raise DataError(origin, f"{key} keyed by {letters}: expected consecutive letters from A", "bad options")
            by_letter = {str(k).strip().upper(): v for k, v in value.items()}
            return [str(by_letter[letter]) for letter in letters]
        listed = _listish(value)
        if listed is None:
            raise DataError(origin, f"{key} must be a list of option texts, got {type(value).__name__}", "bad options")
        return [str(v) for v in listed]
    present = [letter for letter in _LETTERS if _present(raw.get(letter))]
    if present and present != list(_LETTERS[: len(present)]):
        raise DataError(origin, f"option columns {present}: expected consecutive letters from A", "bad options")
    return [str(raw[letter]) for letter in present]


def _gold(raw: Mapping, extra: Mapping, kind: str, choices: list[str], origin: RowOrigin) -> str:
    value = None
    reward_model = raw.get("reward_model")
    if isinstance(reward_model, Mapping) and _present(reward_model.get("ground_truth")):
        value = reward_model["ground_truth"]
    else:
        _, value = _first(raw, extra, _ANSWER_KEYS)
    if value is None:
        raise DataError(origin, f"no ground truth: none of reward_model.ground_truth, {', '.join(_ANSWER_KEYS)} is set", "no ground truth")
    listed = _listish(value)
    if listed is not None:
        golds = [str(v).strip() for v in listed if _present(v)]
        if not golds:
            raise DataError(origin, "the ground truth is an empty list", "no ground truth")
        if len(golds) > 1:
            if kind not in ("em", "f1"):
                raise DataError(origin, f"{len(golds)} ground truths for a {kind} answer; only em/f1 answers take aliases", "bad ground truth")
            return json.dumps(golds)
        value = golds[0]
    gold = str(value).strip()
    if "\\boxed" in gold or "\\fbox" in gold:
        gold = extract_boxed(gold) or gold
    if not gold:
        raise DataError(origin, "the ground truth is empty", "no ground truth")
    if kind == "choice":
        letters = {_LETTERS[i]: text for i, text in enumerate(choices)}
        named = extract_choice(gold, letters or None)
        if named is None or (letters and named not in letters):
            raise DataError(origin, f"choice answer {gold!r} names no option of {list(letters) or 'A-Z'}", "bad ground truth")
    elif kind == "numeric" and parse_number(gold) is None:
        raise DataError(origin, f"numeric answer {gold!r} holds no number", "bad ground truth")
    return gold


def _scalar_metadata(raw: Mapping, extra: Mapping) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for mapping in (extra, raw):  # the row's own columns win over extra_info
        for key, value in mapping.items():
            if key in _CONSUMED or value is None:
                continue
            if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 4000):
                if isinstance(value, float) and value != value:
                    continue
                meta[str(key)] = value
            else:
                listed = _listish(value)
                if listed is not None and all(isinstance(v, (str, int, float, bool)) for v in listed) and len(listed) <= 64:
                    meta[str(key)] = listed  # aliases, tags
    extra_json = extra.get("metadata_json") or raw.get("metadata_json")
    if isinstance(extra_json, str) and extra_json:
        try:
            meta.update(json.loads(extra_json))
        except json.JSONDecodeError:
            pass
    return meta


def _with_options(question: str, choices: list[str]) -> tuple[str, bool]:
    """The question with an ``Options:`` block unless it already lists every option."""
    if not choices or all(c.strip() and c.strip() in question for c in choices):
        return question, False
    lines = "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\nOptions:\n{lines}", True


def normalize_row(
    raw: Mapping[str, Any],
    origin: RowOrigin,
    *,
    default_source: str | None = None,
    verifiers: VerifierMap | None = None,
    image_root: str | os.PathLike | None = None,
    probe_images: bool = True,
    grading_only: bool = False,
) -> DataRow:
    """One raw record -> :class:`DataRow`, or :class:`DataError` naming ``origin``.

    ``grading_only``: what a grader needs (source, kind, gold, options); the question and images
    are not read (an evaluator of finished episodes).
    """
    verifiers = verifiers or VerifierMap()
    extra = raw.get("extra_info")
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            extra = {}
    extra = dict(extra) if isinstance(extra, Mapping) else {}
    nested = raw.get("metadata")  # rllm task rows nest their extras here
    if isinstance(nested, Mapping):
        extra = {**nested, **extra}
    extra = {k: v for k, v in extra.items() if v is not None}  # columnar stores fill absent keys with None

    _, source = _first(raw, extra, _SOURCE_KEYS)
    source = str(source).strip() if source is not None else default_source
    if not source:
        raise DataError(origin, "no data_source: the row names no benchmark (pass --source NAME for such files)", "unknown data_source")
    if grading_only:
        question, named, system, images = "", 0, None, []
        probe_images = False
    else:
        question, named, system = _question(raw, extra, origin)
        images = _images(raw, extra, origin)
    if named and named != len(images):
        raise DataError(origin, f"the prompt names {named} <image> placeholder(s) but the row holds {len(images)} image(s)", "missing image")
    choices = _choices(raw, extra, origin)
    _, answer_type = _first(raw, extra, _KIND_KEYS)
    try:
        kind, how = verifiers.row_kind(source, None if answer_type is None else str(answer_type), bool(choices))
    except KeyError as e:
        raise DataError(origin, str(e.args[0]), "unknown data_source") from None
    except ValueError as e:
        raise DataError(origin, str(e), "unknown answer kind") from None
    gold = _gold(raw, extra, kind, choices, origin)
    if kind == "choice":
        question, _ = _with_options(question, choices) if not grading_only else (question, False)
    else:
        choices = []

    id_key, task_id = _first(raw, extra, _ID_KEYS)
    task_id = str(task_id) if id_key is not None else f"{Path(origin.file).stem}-{origin.row}"
    task_id = task_id.replace(":", "_").strip() or f"{Path(origin.file).stem}-{origin.row}"

    root = str(image_root) if image_root is not None else str(Path(origin.file).parent)
    infos: list[ImageInfo] = []
    if probe_images:
        for i, ref in enumerate(images):
            try:
                infos.append(probe_image(ref, root))
            except ImageError as e:
                raise DataError(origin, f"image {i}: {e}", _image_category(e)) from None
    system_prompt = system or (str(raw["system_prompt"]) if _present(raw.get("system_prompt")) else None)
    return DataRow(
        task_id=task_id, source=source, kind=kind, kind_how=how, question=question, answer=gold, choices=tuple(choices),
        images=tuple(images), image_info=tuple(infos), origin=origin, image_root=root, system_prompt=system_prompt,
        metadata=_scalar_metadata(raw, extra),
    )


# --------------------------------------------------------------------------------------------
# Whole files


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

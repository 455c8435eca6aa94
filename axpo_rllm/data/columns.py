"""One raw record -> :class:`~axpo_rllm.data.rows.DataRow` (:func:`normalize_row`): the column
spellings of the public data sets read into one question, its gold answer, options and images.

Column spellings (first found wins; ``extra_info`` is searched too): question ``prompt`` /
``question`` / ``problem`` / ``query`` / ``instruction``; answer ``reward_model.ground_truth`` /
``ground_truth`` / ``answer`` / ``label`` / ``solution``; images ``images`` / ``image`` /
``decoded_image`` / ``image_path(s)``; options ``options`` / ``choices`` or ``A``..``J`` columns;
answer kind ``answer_kind`` / ``answer_type`` / ``question_type``; id ``id`` / ``task_id`` /
``uid`` / ``pid`` / ``index`` ...; benchmark ``benchmark`` / ``data_source`` (else ``source=``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from axpo_rllm.envs.images import ImageError, ImageInfo, is_image_ref, probe_image
from axpo_rllm.envs.verifiers import extract_boxed, extract_choice, parse_number

from .rows import DataError, DataRow, RowOrigin, image_category
from .sources import VerifierMap

__all__ = ["normalize_row"]

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
                raise DataError(origin, f"image {i}: {e}", image_category(e)) from None
    system_prompt = system or (str(raw["system_prompt"]) if _present(raw.get("system_prompt")) else None)
    return DataRow(
        task_id=task_id, source=source, kind=kind, kind_how=how, question=question, answer=gold, choices=tuple(choices),
        images=tuple(images), image_info=tuple(infos), origin=origin, image_root=root, system_prompt=system_prompt,
        metadata=_scalar_metadata(raw, extra),
    )

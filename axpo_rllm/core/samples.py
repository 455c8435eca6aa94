"""The ``samples.jsonl`` record: one evaluated episode, as ``axpo-rllm eval`` writes it
(``axpo_rllm.train.evaluate``) and ``axpo-rllm data`` reads it back (``axpo_rllm.data.rollouts``).

It lives in core because the writer (train) and the reader (data) are independent siblings and core
is the layer both import. One JSON object per line; only ``task_id`` and a boolean ``correct`` are
required, so rollouts recorded by other tools read as well: a missing ``benchmark`` is ``None``, a
missing ``sample`` index is given by the reader, the counts default to zero.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .records import Termination

__all__ = ["SampleRecord"]


@dataclass
class SampleRecord:
    """One evaluated episode (a line of ``samples.jsonl``)."""

    benchmark: str | None
    """The question's benchmark (its ``data_source``); ``None`` in recordings that do not name one."""
    task_id: str
    sample: int
    """Index of the sample among the question's n (its seed derives from it)."""
    correct: bool
    reward: float = 0.0
    tool_calls: int = 0
    """Calls the model attempted (valid and malformed)."""
    malformed_calls: int = 0
    turns: int = 0
    termination: str = ""
    error: str = ""
    response: str = ""
    """The last assistant turn's text (truncated), for reading results."""
    messages: list | None = None
    """With recording on: the assistant/tool turns after the prompt (``<image>`` placeholders)."""
    tool_images: list | None = None
    """With recording on: file names (in the run's ``images/``) of the images tools returned, in order."""
    origin: str = field(default="", compare=False, repr=False)
    """Where the record was read from (``file, line n``) for error messages; never written."""

    @property
    def used_tool(self) -> bool:
        return self.tool_calls > 0

    @property
    def failed(self) -> bool:
        return self.termination == Termination.ERROR.value

    @property
    def key(self) -> tuple[str | None, str, int]:
        return (self.benchmark, self.task_id, self.sample)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "origin"}
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any, index: int = 0, origin: str = "") -> "SampleRecord":
        """The record of one decoded line; ``index`` is the sample index when the line has none.

        A line without ``task_id`` or a boolean ``correct`` is a ``ValueError`` saying so.
        """
        if not isinstance(data, dict) or "task_id" not in data or not isinstance(data.get("correct"), bool):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a recorded sample needs `task_id` and a boolean `correct`, got {got}")
        bench = data.get("benchmark")
        messages, images = data.get("messages"), data.get("tool_images")
        return cls(
            benchmark=str(bench) if bench is not None else None,
            task_id=str(data["task_id"]),
            sample=int(data.get("sample", index)),
            correct=data["correct"],
            reward=float(data.get("reward", 0.0) or 0.0),
            tool_calls=int(data.get("tool_calls", 0) or 0),
            malformed_calls=int(data.get("malformed_calls", 0) or 0),
            turns=int(data.get("turns", 0) or 0),
            termination=str(data.get("termination", "")),
            error=str(data.get("error", "")),
            response=str(data.get("response", "")),
            messages=list(messages) if isinstance(messages, list) else None,
            tool_images=list(images) if isinstance(images, list) else None,
            origin=origin,
        )

    @classmethod
    def from_json(cls, line: str, index: int = 0, origin: str = "") -> "SampleRecord":
        """:meth:`from_dict` of a JSON line (a ``json.JSONDecodeError``, a ``ValueError``, when it is not JSON)."""
        return cls.from_dict(json.loads(line), index, origin)

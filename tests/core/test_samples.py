"""The one ``samples.jsonl`` record: what the eval writer writes, the cache and the data reader read back."""

from __future__ import annotations

import json

import pytest

from axpo_rllm.core.samples import SampleRecord


def test_a_written_record_reads_back_equal_and_keeps_no_origin():
    rec = SampleRecord("chartqa", "q1", 2, True, 1.0, 3, 1, 4, "answer", response="42",
                       messages=[{"role": "assistant", "content": "x"}], tool_images=["a.png"], origin="f, line 1")
    line = rec.to_json()
    assert "origin" not in json.loads(line)
    back = SampleRecord.from_json(line, origin="g, line 9")
    assert back == rec and back.origin == "g, line 9"


def test_a_bare_record_from_elsewhere_takes_the_defaults():
    back = SampleRecord.from_dict({"task_id": 7, "correct": False}, index=3)
    assert (back.benchmark, back.task_id, back.sample, back.tool_calls, back.tool_images) == (None, "7", 3, 0, None)


@pytest.mark.parametrize("data", [{"correct": True}, {"task_id": "q", "correct": "yes"}, ["q", True]])
def test_a_record_without_task_id_or_boolean_correct_is_refused(data):
    with pytest.raises(ValueError, match="needs `task_id` and a boolean `correct`"):
        SampleRecord.from_dict(data)

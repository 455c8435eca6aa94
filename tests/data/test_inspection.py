"""``data.inspection``: what ``axpo-rllm data inspect`` counts, and a truncated image stopping or counted."""

from __future__ import annotations

import pytest

from axpo_rllm.data.inspection import inspect_rows, percentiles
from axpo_rllm.data.loaders import DataError, LoadReport, read_rows
import synthetic_datasets as sd


@pytest.fixture()
def vstar_with_a_truncated_image(tmp_path):
    path = sd.jsonl_vstar(tmp_path, 3)
    (tmp_path / "images" / "v1.jpg").write_bytes(sd.truncated_png())
    return path


def test_counts_per_source_kind_and_image(tmp_path):
    seen = inspect_rows(read_rows([sd.jsonl_vstar(tmp_path, 3)]))
    summary = seen.as_dict(LoadReport())
    assert summary["sources"] == {"vstar": {"choice": 3}} and summary["verifier_resolution"] == {"vstar": {"benchmark": 3}}
    assert summary["images_per_row"] == {"1": 3} and summary["image_formats"] == {"JPEG": 3}
    assert percentiles(seen.widths) == "80 / 80 / 80" and percentiles([]) == "—"


def test_a_truncated_image_stops_the_decode_or_is_counted(vstar_with_a_truncated_image):
    with pytest.raises(DataError, match="line 2"):
        inspect_rows(read_rows([vstar_with_a_truncated_image]), decode=True)
    report = LoadReport()
    seen = inspect_rows(read_rows([vstar_with_a_truncated_image], report=report), decode=True, skip_bad=True, report=report)
    assert seen.decode_failures == 1 and report.rows_skipped == 1

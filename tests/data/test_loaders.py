"""Loaders: every public format to DataRows and Tasks; the verifier map; bad rows named or counted, never dropped."""

from __future__ import annotations

import base64
import json

import pytest

import synthetic_datasets as sd
from axpo_rllm.data.loaders import BATCH_ROWS, DataError, LoadReport, load_rows, read_rows
from axpo_rllm.data.sources import VerifierMap, normalize_source, parse_overrides
from axpo_rllm.envs.verifiers import GraderStats, Grader


def grade(row, response: str):
    task = row.task()
    return Grader(stats=GraderStats()).grade_task(task, response)


def by_id(rows):
    return {r.task_id: r for r in rows}


def test_verl_parquet_rows(suite):
    rows, report = load_rows(suite["fvqa"])
    assert report.rows_ok == report.rows_read == 3 and not report.skipped
    r0, r1 = rows[0], rows[1]
    assert (r0.source, r0.kind, r0.grader_source) == ("fvqa", "em", "search_qa")
    assert r0.question == "Which city is this landmark in? (#0)" and "<image>" not in r0.question
    assert json.loads(r0.answer) == ["Paris", "paris, france"] and r1.answer == "Gustave Eiffel"
    assert r0.system_prompt == "Answer with a short phrase."
    assert isinstance(r0.images[0], dict)  # still a reference: nothing decoded at load
    assert (r0.image_info[0].width, r0.image_info[0].height, r0.image_info[0].format) == (48, 40, "PNG")
    task = r0.task()
    assert task.images[0].size == (48, 40) and task.data_source == "search_qa" and task.metadata["benchmark"] == "fvqa"
    assert grade(r0, "<think>it is</think>\\boxed{paris, france}").correct
    assert not grade(r1, "\\boxed{Paris}").correct


def test_hf_dataset_with_image_features_needs_a_source_and_maps_options_to_choice(suite):
    with pytest.raises(DataError, match=r"mathvision, row 0: no data_source.*--source"):
        load_rows(suite["mathvision"])
    rows = by_id(load_rows(suite["mathvision"], source="MathVision")[0])
    mc, free = rows["0"], rows["1"]
    assert (mc.kind, mc.kind_how, mc.choices, mc.answer) == ("choice", "row options", ("3", "4", "5", "6"), "B")
    assert mc.question.endswith("Options:\nA. 3\nB. 4\nC. 5\nD. 6")
    assert (free.kind, free.kind_how, free.answer, free.choices) == ("math", "benchmark", "4", ())
    assert grade(mc, "\\boxed{B}").correct and grade(mc, "\\boxed{4}").correct  # the letter or the option's text
    assert not grade(mc, "\\boxed{C}").correct
    assert grade(free, "\\boxed{4}").correct and not grade(free, "\\boxed{5}").correct
    assert mc.task().images[0].size == (48, 40)


def test_jsonl_with_an_image_folder(suite):
    rows = load_rows(suite["vstar"])[0]
    assert [r.answer for r in rows] == ["A", "B", "C"] and {r.kind for r in rows} == {"choice"}
    assert rows[0].images == ("images/v0.jpg",) and rows[0].image_info[0].format == "JPEG"
    assert rows[0].task().images[0].size == (80, 60)
    assert rows[0].origin.unit == "line" and rows[0].origin.row == 1
    assert grade(rows[1], "The answer is \\boxed{B}").correct and not grade(rows[1], "\\boxed{A}").correct


def test_training_set_styles_and_row_answer_types(tmp_path):
    virl = load_rows(sd.virl_parquet(tmp_path / "virl.parquet"))[0]
    assert {(r.source, r.kind, r.kind_how) for r in virl} == {("ViRL39K", "math", "benchmark prefix virl")}
    assert virl[1].answer == "3" and virl[1].task_id == "virl-1"  # \boxed{3} unwrapped for the verifier
    assert grade(virl[1], "\\boxed{3}").correct and virl[1].metadata["category"] == "arithmetic"

    hr = load_rows(sd.tsv_hrbench(tmp_path / "hrbench_8k.tsv"), source="HR-Bench 8K")[0]
    assert hr[0].choices == ("red", "blue", "green", "yellow") and hr[0].kind == "choice" and hr[0].image_info[0].width == 96
    assert grade(hr[0], "\\boxed{blue}").correct

    dyn = by_id(load_rows(sd.dynamath_jsonl(tmp_path / "dyn"))[0])
    assert (dyn["d0"].kind, dyn["d1"].kind, dyn["d2"].kind) == ("choice", "numeric", "math")
    assert grade(dyn["d1"], "\\boxed{0.51}").correct  # the row's own rel_tol (3%) reaches the verifier
    assert not grade(dyn["d1"], "\\boxed{0.6}").correct


def test_source_names_and_overrides():
    assert normalize_source("lmms-lab/HR-Bench 8K") == "hrbench8k" and normalize_source("V*") == "vstar"
    vm = VerifierMap()
    assert vm.resolve("V*").kind == "choice" and vm.resolve("MMSearch").kind == "f1"
    assert vm.resolve("Math-VR").kind == "math" and vm.resolve("hiyouga/geometry3k").how == "registered verifier"
    with pytest.raises(KeyError, match="unknown data_source 'mystery'.*--verifier mystery=KIND"):
        vm.resolve("mystery")
    forced = VerifierMap(parse_overrides(["mystery=numeric", "vstar=em"]))
    assert forced.resolve("Mystery").kind == "numeric" and forced.row_kind("vstar", "multiple choice", True) == ("em", "override")
    assert VerifierMap({"*": "f1"}).resolve("anything").kind == "f1"
    assert vm.row_kind("mathvision", "free_form", True) == ("choice", "row options")  # free-form keeps looking
    with pytest.raises(ValueError, match="unknown answer kind 'fuzzy'"):
        VerifierMap({"x": "fuzzy"})
    with pytest.raises(ValueError, match="NAME=KIND"):
        parse_overrides(["vstar"])


def test_bad_rows_are_errors_naming_file_and_line(tmp_path):
    path = sd.bad_jsonl(tmp_path / "b")
    rows = read_rows(path)
    assert next(rows).task_id == "g"  # lazy: the good first row comes before the bad one is read
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: image 0: image file not found: .*missing\.png") as info:
        next(rows)
    assert info.value.category == "missing image"


@pytest.mark.parametrize("skip_line,pattern", [
    (3, r"line 3: image 0: .*cannot be read as an image"),
    (4, r"line 4: no ground truth"),
    (5, r"line 5: unknown data_source 'mystery-bench'"),
    (6, r"line 6: unknown answer kind 'vibes'"),
    (7, r"line 7: the prompt names 2 <image> placeholder\(s\) but the row holds 1"),
    (8, r"line 8: invalid JSON"),
    (9, r"line 9: duplicate id 'g' in vstar \(first at line 1\)"),
    (10, r"line 10: choice answer 'Z' names no option of \['A', 'B'\]"),
])
def test_each_kind_of_bad_row_has_its_own_message(tmp_path, skip_line, pattern):
    _, report = load_rows(sd.bad_jsonl(tmp_path / "b"), skip_bad=True)
    assert any(__import__("re").search(pattern, e) for e in report.examples), report.examples


def test_skip_bad_counts_every_skipped_row(tmp_path):
    rows, report = load_rows(sd.bad_jsonl(tmp_path / "b"), skip_bad=True)
    assert [r.task_id for r in rows] == ["g"]
    assert report.rows_read == 10 and report.rows_ok == 1 and report.rows_skipped == 9
    assert report.skipped == {"missing image": 2, "corrupt image": 1, "no ground truth": 1, "unknown data_source": 1,
                              "unknown answer kind": 1, "invalid record": 1, "duplicate id": 1, "bad ground truth": 1}
    assert "1 of 10 rows loaded; 9 skipped" in report.summary()


def test_a_truncated_image_passes_the_header_probe_and_fails_at_decode(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "vstar", "question": "Q?", "answer": "A", "images": [{"bytes": data, "path": None}]}
            for data in (sd.png(), sd.truncated_png())]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    good, bad = load_rows(path)[0]  # both headers read: 64x64 known without decoding
    assert bad.image_info[0].width == 64
    good.task()
    with pytest.raises(DataError, match=r"t\.parquet, row 1: image 0: image bytes cannot be decoded") as info:
        bad.task()
    assert info.value.category == "corrupt image"


def test_garbage_bytes_in_a_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "fvqa", "prompt": [{"role": "user", "content": "<image>Q?"}], "reward_model": {"ground_truth": "x"},
             "images": [{"bytes": data, "path": None}]} for data in (sd.png(), b"\x89PNG but not really")]
    path = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"g\.parquet, row 1: image 0: image bytes cannot be read as an image"):
        load_rows(path)


def test_a_large_parquet_streams_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 3 * BATCH_ROWS
    image = sd.png()
    rows = [{"data_source": "fvqa", "question": f"Q{i}?", "answer": "x" if i < n - 1 else None, "id": str(i),
             "images": [{"bytes": image, "path": None}]} for i in range(n)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=BATCH_ROWS)
    stream = read_rows(path)
    assert [next(stream).task_id for _ in range(5)] == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError, match=rf"big\.parquet, row {n - 1}: no ground truth"):
        for _ in stream:
            pass
    report = LoadReport()
    assert sum(1 for _ in read_rows(path, skip_bad=True, report=report)) == n - 1 and report.rows_skipped == 1


def test_dataset_dict_needs_a_split(tmp_path):
    import datasets

    d = datasets.DatasetDict({s: datasets.Dataset.from_dict({"question": ["q"], "answer": ["4"]}) for s in ("test", "testmini")})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['test', 'testmini'\]: choose one with --split"):
        load_rows(tmp_path / "dd", source="mathvision")
    rows = load_rows(tmp_path / "dd", source="mathvision", split="testmini")[0]
    assert rows[0].images == () and rows[0].kind == "math"


def test_base64_and_data_urls_are_images(tmp_path):
    from axpo_rllm.envs.images import ImageError, open_image, probe_image

    data = sd.jpeg()
    assert probe_image(base64.b64encode(data).decode()).format == "JPEG"
    assert open_image("data:image/jpeg;base64," + base64.b64encode(data).decode()).size == (64, 48)
    with pytest.raises(ImageError, match="not found"):
        probe_image("no/such/file.png")


def test_a_folder_of_hugging_face_parquet_shards(tmp_path):
    """A hub snapshot: data/test-0000N-of-00002.parquet with the Image feature's {bytes, path} struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "snap" / "data").mkdir(parents=True)
    for shard in range(2):
        rows = [{"question": f"Is box {shard}-{i} red?", "answer": "yes", "image": {"bytes": sd.png("red"), "path": f"{shard}-{i}.png"},
                 "pid": f"{shard}-{i}"} for i in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "snap" / "data" / f"test-0000{shard}-of-00002.parquet")
    rows, report = load_rows(tmp_path / "snap", source="VisualProbe")
    assert [r.task_id for r in rows] == ["0-0", "0-1", "1-0", "1-1"] and report.files == [str(tmp_path / "snap")]
    assert {r.kind for r in rows} == {"em"} and rows[3].origin.file.endswith("test-00001-of-00002.parquet")
    assert rows[0].task().images[0].size == (48, 40)


def test_loaders_names_the_readers_the_normaliser_and_the_records_from_their_modules():
    from axpo_rllm.data import columns, formats, loaders, rows

    owners = {"iter_records": formats, "BATCH_ROWS": formats, "normalize_row": columns, "DataRow": rows,
              "DataError": rows, "LoadReport": rows, "RowOrigin": rows, "reject_or_raise": rows}
    assert all(getattr(loaders, name) is getattr(owner, name) for name, owner in owners.items())

"""Writers: verl RL parquet (read back by us and by verl), verl's reward function, rllm rows, the SFT parquet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import synthetic_datasets as sd
from axpo_rllm.data.loaders import DataError, load_rows
from axpo_rllm.data.reward import compute_score
from axpo_rllm.data.writers import read_sft_parquet, rllm_row, verl_row, write_sft_parquet, write_verl_parquet
from axpo_rllm.envs.images import image_bytes


def suite_rows(suite):
    rows = []
    for name, path in suite.items():
        rows += load_rows(path, source="MathVision" if name == "mathvision" else None)[0]
    return rows


def test_verl_parquet_round_trip_keeps_questions_answers_kinds_and_image_bytes(suite, tmp_path):
    rows = suite_rows(suite)
    out = tmp_path / "rl.parquet"
    assert write_verl_parquet(rows, out, split="test") == 9
    back, report = load_rows(out)
    assert report.rows_ok == 9
    for a, b in zip(rows, back):
        assert (b.source, b.task_id, b.kind, b.question, b.answer, b.choices) == (a.source, a.task_id, a.kind, a.question, a.answer, a.choices)
        assert [image_bytes(i, b.image_root) for i in b.images] == [image_bytes(i, a.image_root) for i in a.images]
        assert b.kind_how == "row answer_type"  # the kind travels in extra_info.answer_kind
    assert back[0].system_prompt == rows[0].system_prompt == "Answer with a short phrase."

    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.column_names == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["prompt"][-1] == {"role": "user", "content": "<image>Which city is this landmark in? (#0)"}
    assert first["extra_info"]["answer_kind"] == "em" and first["reward_model"]["ground_truth"] == rows[0].answer


def test_verl_reads_the_parquet_we_write(suite, tmp_path, model_dir, tokenizer):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from axpo_rllm.engines.transformers_engine import load_image_processor

    out = tmp_path / "rl.parquet"
    write_verl_parquet(suite_rows(suite), out)
    # verl only needs the processor's image settings to build the messages (no torchvision here).
    stub = SimpleNamespace(image_processor=load_image_processor(model_dir))
    ds = RLHFDataset(str(out), tokenizer, OmegaConf.create({"max_prompt_length": 4096, "filter_overlong_prompts": False}), processor=stub)
    assert len(ds) == 9
    item = ds[7]  # MathVision, the math row
    (user,) = item["raw_prompt"]
    assert [p["type"] for p in user["content"]] == ["image", "text"] and user["content"][0]["image"].size == (48, 40)
    assert item["data_source"] == "MathVision" and item["reward_model"]["ground_truth"] == "4"
    assert compute_score(item["data_source"], "\\boxed{4}", item["reward_model"]["ground_truth"], item["extra_info"])["score"] == 1.0


def test_compute_score_picks_the_verifier_by_answer_kind(suite):
    rows = {r.task_id + r.source: r for r in suite_rows(suite)}
    mc = verl_row(rows["0MathVision"], 0)
    assert compute_score(mc["data_source"], "\\boxed{B}", mc["reward_model"]["ground_truth"], mc["extra_info"])["acc"] == 1.0
    assert compute_score(mc["data_source"], "\\boxed{4}", mc["reward_model"]["ground_truth"], mc["extra_info"])["acc"] == 1.0
    assert compute_score(mc["data_source"], "\\boxed{A}", mc["reward_model"]["ground_truth"], mc["extra_info"])["acc"] == 0.0
    qa = verl_row(rows["0fvqa"], 0)
    assert compute_score("fvqa", "\\boxed{Paris, France}", qa["reward_model"]["ground_truth"], qa["extra_info"])["score"] == 1.0
    # a file written by someone else: no answer_kind, the benchmark table decides; aliases as a list
    assert compute_score("fvqa", "\\boxed{paris}", ["Paris", "Lutetia"], {})["score"] == 1.0
    assert compute_score("MMSearch", "\\boxed{eiffel tower paris}", "Eiffel Tower", None)["score"] == pytest.approx(0.8)
    with pytest.raises(KeyError, match="unknown data_source 'mystery'"):
        compute_score("mystery", "\\boxed{1}", "1", {})


def test_a_corrupt_image_body_stops_the_write_or_is_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "vstar", "question": f"Q{i}?", "answer": "A", "id": str(i), "images": [{"bytes": data, "path": None}]}
            for i, data in enumerate((sd.png(), sd.truncated_png(), sd.png()))]
    src = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    loaded, report = load_rows(src)
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError, match=r"src\.parquet, row 1: image 0: image bytes cannot be decoded"):
        write_verl_parquet(loaded, out)
    assert not out.exists() and not (tmp_path / "out.parquet.partial").exists()  # no half file left behind
    assert write_verl_parquet(loaded, out, skip_bad=True, report=report) == 2
    assert report.rows_ok == 2 and report.skipped == {"corrupt image": 1}
    assert [r.task_id for r in load_rows(out)[0]] == ["0", "2"]


def test_rllm_rows_become_tasks_our_workflow_grades(suite):
    from axpo_rllm.envs.adapters.rllm import task_from_dict
    from axpo_rllm.envs.verifiers import Grader, GraderStats

    rows = {r.task_id + r.source: r for r in suite_rows(suite)}
    grader = Grader(stats=GraderStats())
    mc = rllm_row(rows["0MathVision"])
    assert (mc["data_source"], mc["benchmark"], mc["answer_kind"]) == ("choice", "MathVision", "choice")
    task = task_from_dict(mc)
    assert task.images[0].size == (48, 40) and task.metadata["choices"] == ["3", "4", "5", "6"]
    assert grader.grade_task(task, "\\boxed{4}").correct and not grader.grade_task(task, "\\boxed{3}").correct
    qa = task_from_dict(rllm_row(rows["0fvqa"]))
    assert qa.data_source == "search_qa" and grader.grade_task(qa, "\\boxed{paris}").correct


def test_sft_parquet_round_trip_and_what_verl_reads(tmp_path, tokenizer):
    tools = [{"type": "function", "function": {"name": "crop", "description": "c", "parameters": {
        "type": "object", "properties": {"bbox": {"type": "array"}}, "required": ["bbox"]}}},
        {"type": "function", "function": {"name": "python", "description": "p", "parameters": {
            "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]
    example = {
        "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "<tool_call>x</tool_call>"},
                     {"role": "tool", "content": "cropped<image>"}, {"role": "assistant", "content": "\\boxed{A}"}],
        "images": [{"bytes": sd.png(), "path": None}, {"bytes": sd.jpeg(), "path": "crop.png"}],
        "tools": tools, "data_source": "vstar", "task_id": "v0", "sample": 2,
    }
    out = tmp_path / "sft.parquet"
    assert write_sft_parquet([example, dict(example, sample=3)], out) == 2
    (first, second) = read_sft_parquet(out)
    assert first["messages"] == example["messages"] and first["tools"] == tools and second["sample"] == 3
    assert first["images"][1] == {"bytes": sd.jpeg(), "path": "crop.png"}

    from omegaconf import OmegaConf
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    ds = MultiTurnSFTDataset(str(out), tokenizer, OmegaConf.create({"max_length": 512}),
                             processor=SimpleNamespace(image_processor=SimpleNamespace(patch_size=14)))
    assert len(ds) == 2 and [m["role"] for m in ds.messages[0]] == ["user", "assistant", "tool", "assistant"]
    assert [t["function"]["name"] for t in ds.tools[0]] == ["crop", "python"]

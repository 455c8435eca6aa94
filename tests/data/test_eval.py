"""Evaluation: Pass@k from samples, exact scores with a scripted engine, recording -> SFT export and the
paper's filter, and an interrupted evaluation of the real tiny model resumed to the uninterrupted result."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.data.export import ExportReport, sft_examples
from axpo_rllm.data.filtering import FilterReport, paper_filter
from axpo_rllm.data.loaders import DataError, LoadReport, load_rows
from axpo_rllm.data.rollouts import read_samples
from axpo_rllm.data.writers import read_sft_parquet, write_sft_parquet
from axpo_rllm.envs.env import MultimodalToolEnv, build_tools
from axpo_rllm.envs.images import open_image
from axpo_rllm.train.evaluate import EvalItem, SampleRecord, evaluate_items, markdown_table, score_samples
from scripted_engine import Interrupting, ScriptedEngine, suite_reply


def brute_pass(outcomes: list[bool], k: int) -> float:
    draws = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in d) for d in draws) / len(draws)


def test_scores_per_benchmark_and_averaged_match_enumeration():
    rng = random.Random(7)
    samples = []
    for bench, n_q in (("a", 3), ("b", 2), ("c", 4)):
        for q in range(n_q):
            for i in range(6):
                calls = rng.choice([0, 0, 1, 2])
                samples.append(SampleRecord(bench, f"q{q}", i, rng.random() < 0.4, 0.0, calls, rng.randint(0, calls), rng.randint(1, 3), "answer"))
    scores = score_samples(samples, k=4)
    per_bench = {}
    for bench in ("a", "b", "c"):
        mine = [s for s in samples if s.benchmark == bench]
        qs = sorted({s.task_id for s in mine})
        outcomes = {q: [s.correct for s in mine if s.task_id == q] for q in qs}
        t = scores["by_benchmark"][bench]
        assert t["pass@4"] == pytest.approx(sum(brute_pass(o, 4) for o in outcomes.values()) / len(qs))
        assert t["pass@1"] == pytest.approx(sum(sum(o) / 6 for o in outcomes.values()) / len(qs))
        assert t["malformed_call_rate"] == pytest.approx(sum(s.malformed_calls for s in mine) / sum(s.tool_calls for s in mine))
        assert t["mean_turns"] == pytest.approx(sum(s.turns for s in mine) / len(mine))
        assert scores[f"eval/{bench}/pass@4"] == t["pass@4"]
        per_bench[bench] = t
    assert scores["eval/avg/pass@1"] == pytest.approx(sum(t["pass@1"] for t in per_bench.values()) / 3)
    assert scores["eval/questions"] == 9 and scores["all"]["samples"] == 54
    table = markdown_table(scores)
    assert table.count("\n| ") == 5 and "| b | 2 |" in table and "**average** (3 benchmarks)" in table
    with pytest.raises(ValueError, match="at least 4 samples"):
        score_samples(samples[:3], k=4)


def suite_rows(suite):
    return [r for name, path in suite.items() for r in load_rows(path, source="MathVision" if name == "mathvision" else None)[0]]


@pytest.fixture(scope="module")
def crop_env():
    tools = build_tools(["crop"])
    return lambda: MultimodalToolEnv(tools=tools)


@pytest.fixture(scope="module")
def scripted_run(suite, tokenizer, crop_env, tmp_path_factory):
    rows = suite_rows(suite)
    out = tmp_path_factory.mktemp("scripted")
    engine = ScriptedEngine(tokenizer, suite_reply)
    result = evaluate_items(engine, ChatFormat(tokenizer), crop_env, [EvalItem(r.source, r.task_id, r.task) for r in rows],
                            n=4, k=4, out_dir=out, record=True, fingerprint={"tool_schemas": crop_env().tool_schemas()})
    return rows, out, result


def test_scripted_eval_scores_tool_use_malformed_calls_and_turns(scripted_run):
    _, _, result = scripted_run
    s = result.scores["by_benchmark"]
    assert s["vstar"]["pass@1"] == pytest.approx(1 / 3) and s["vstar"]["pass@4"] == pytest.approx(1 / 3)
    assert (s["vstar"]["tool_use_rate"], s["vstar"]["mean_turns"]) == (0.0, 1.0) and math.isnan(s["vstar"]["malformed_call_rate"])
    assert s["fvqa"]["pass@1"] == pytest.approx(1 / 3) and s["fvqa"]["malformed_call_rate"] == 1.0
    assert (s["fvqa"]["tool_use_rate"], s["fvqa"]["mean_turns"]) == (1.0, 2.0)
    math_row = [x for x in result.samples if x.benchmark == "MathVision" and x.task_id == "1"]
    assert [x.correct for x in math_row] == ["\\boxed{4}" in x.response for x in math_row]  # graded by what it said
    c = sum(x.correct for x in math_row)
    assert s["MathVision"]["pass@1"] == pytest.approx((8 + c) / 12)
    assert s["MathVision"]["pass@4"] == pytest.approx((2 + brute_pass([x.correct for x in math_row], 4)) / 3)
    assert s["MathVision"]["tool_use_rate"] == pytest.approx(2 / 3) and s["MathVision"]["malformed_call_rate"] == 0.0
    assert s["MathVision"]["mean_turns"] == pytest.approx(20 / 12)
    assert result.scores["eval/avg/pass@1"] == pytest.approx((1 / 3 + 1 / 3 + (8 + c) / 12) / 3)
    assert result.scores["eval/failed_rollouts"] == 0 and len(result.samples) == 36


def test_recorded_trajectories_export_to_sft_rows(scripted_run, tmp_path):
    rows, out, result = scripted_run
    recording = read_samples(out)
    assert len(recording.samples) == 36 and recording.config["tool_schemas"][0]["function"]["name"] == "crop"
    report = ExportReport()
    examples = list(sft_examples(rows, recording, report=report))
    c = sum(x.correct for x in result.samples if x.benchmark == "MathVision" and x.task_id == "1")
    assert report.exported == len(examples) == 4 + 8 + c
    assert report.left_out["with a malformed call"] == 4 and report.left_out["incorrect"] == 36 - 16 - c
    mc = next(e for e in examples if e["data_source"] == "MathVision" and e["task_id"] == "0")
    assert [m["role"] for m in mc["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert mc["messages"][1]["content"].startswith("<image>How many sides") and mc["messages"][2]["content"].endswith("</tool_call>")
    assert mc["messages"][3]["content"].endswith("<image>") and mc["messages"][4]["content"] == "\\boxed{B}"
    assert open_image(mc["images"][0]["bytes"]).size == (48, 40)
    assert open_image(mc["images"][1]["bytes"]).size[0] >= 24  # the crop the tool returned, from the run's images/
    path = tmp_path / "sft.parquet"
    assert write_sft_parquet(examples, path) == len(examples)
    assert read_sft_parquet(path)[0]["tools"] == recording.config["tool_schemas"]


def write_recording(path, outcomes: dict[tuple[str, str], list[bool]]):
    path.write_text("".join(json.dumps({"benchmark": b, "task_id": t, "sample": i, "correct": c}) + "\n"
                            for (b, t), cs in outcomes.items() for i, c in enumerate(cs)))
    return read_samples(path)


def test_paper_filter_drops_what_sft_solves_and_the_teacher_fails(scripted_run, tmp_path):
    rows, out, result = scripted_run
    sft = read_samples(out)  # the scripted run stands in for the SFT model
    teacher_outcomes = {(r.source, r.task_id): [True, False, True, True] for r in rows}
    teacher_outcomes[("vstar", "v2")] = [False] * 4
    teacher_outcomes[("fvqa", "0")] = [False] * 5  # the SFT model solves it 4/4: that decides first
    counts = FilterReport(4)
    kept = list(paper_filter(rows, sft, write_recording(tmp_path / "teacher.jsonl", teacher_outcomes), filter_report=counts))
    math_solved = all(x.correct for x in result.samples if x.benchmark == "MathVision" and x.task_id == "1")
    expected = {("vstar", "v1"), ("fvqa", "1"), ("fvqa", "2")} | (set() if math_solved else {("MathVision", "1")})
    assert {(r.source, r.task_id) for r in kept} == expected
    assert counts.dropped_sft_solved == 4 + math_solved and counts.dropped_teacher_failed == 1 and counts.kept == len(expected)

    del teacher_outcomes[("fvqa", "2")]
    teacher_outcomes[("fvqa", "1")] = [True, True]
    teacher = write_recording(tmp_path / "teacher2.jsonl", teacher_outcomes)
    with pytest.raises(DataError, match=r"fvqa\.parquet, row 1: 2 teacher rollouts recorded for fvqa/1; the filter reads 4"):
        list(paper_filter(rows, sft, teacher))
    report = LoadReport(rows_ok=len(rows))
    kept = list(paper_filter(rows, sft, teacher, skip_bad=True, report=report))
    assert report.skipped == {"too few teacher rollouts": 1, "no teacher rollouts": 1} and len(kept) == len(expected) - 2


def test_an_interrupted_eval_of_the_tiny_model_resumes_to_the_uninterrupted_result(suite, model_dir, crop_env, tmp_path):
    from axpo_rllm.engines.transformers_engine import TransformersEngine

    rows = suite_rows(suite)
    items = [EvalItem(r.source, r.task_id, r.task) for r in rows]
    agent = AgentConfig(max_tokens_per_turn=12, max_turns=2)

    def run(engine, out):
        chat = ChatFormat(engine.tokenizer)
        # 4 episodes in flight: one question at a time, so some questions are complete when the interrupt comes
        return evaluate_items(engine, chat, crop_env, items, n=4, k=4, agent_config=agent, seed=3, out_dir=out, fingerprint={"m": 1},
                              max_concurrency=4)

    with TransformersEngine(model_dir) as engine:
        whole = run(engine, tmp_path / "whole")
    with TransformersEngine(model_dir) as engine, pytest.raises(KeyboardInterrupt):
        run(Interrupting(engine, after=14), tmp_path / "cut")
    cached = (tmp_path / "cut" / "samples.jsonl").read_text().splitlines()
    assert 0 < len(cached) < 36
    with TransformersEngine(model_dir) as engine:
        resumed = run(engine, tmp_path / "cut")
    assert resumed.resumed == len(cached)
    assert [s.to_json() for s in resumed.samples] == [s.to_json() for s in whole.samples]
    assert resumed.scores["by_benchmark"] == whole.scores["by_benchmark"]
    with pytest.raises(ValueError, match=r"other settings \(changed: n\)"):
        with TransformersEngine(model_dir) as engine:
            evaluate_items(engine, ChatFormat(engine.tokenizer), crop_env, items, n=5, k=4, agent_config=agent, seed=3,
                           out_dir=tmp_path / "cut", fingerprint={"m": 1})


def test_a_recording_from_elsewhere_reads_with_line_order_as_index_and_bad_lines_named(tmp_path):
    from axpo_rllm.data.loaders import DataError

    path = tmp_path / "other.jsonl"
    path.write_text('{"task_id": "q", "correct": true}\n\n{"task_id": "q", "correct": false}\n')
    samples = read_samples(path).samples
    assert [(s.benchmark, s.sample, s.correct, s.origin) for s in samples] == [
        (None, 0, True, f"{path}, line 1"), (None, 1, False, f"{path}, line 3")]
    for bad, why in (('{"task_id": "q"}', "boolean `correct`"), ("[1]", "JSON object"), ("{nope", "invalid JSON")):
        path.write_text('{"task_id": "q", "correct": true}\n' + bad + "\n")
        with pytest.raises(DataError, match=f"line 2: .*{why}"):
            read_samples(path)

"""``axpo-rllm data`` and ``axpo-rllm eval`` end to end on a generated three-benchmark suite: the tiny model
(transformers engine, interrupted and resumed), and the HTTP engine against a stand-in token server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from axpo_rllm.cli import main
from axpo_rllm.data.loaders import load_rows
from scripted_engine import Interrupting, ScriptedEngine, suite_reply
import synthetic_datasets as sd


@pytest.fixture()
def files(suite):
    return [str(suite["fvqa"]), str(suite["vstar"]), str(suite["mathvision"])]


def test_data_inspect_and_convert(files, tmp_path, capsys):
    assert main(["data", "inspect", *files]) == 2
    err = capsys.readouterr().err
    assert "mathvision, row 0: no data_source" in err and "--skip-bad" in err
    summary_path = tmp_path / "inspect.json"
    assert main(["data", "inspect", *files, "--source", "MathVision", "--decode", "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["sources"] == {"fvqa": {"em": 3}, "vstar": {"choice": 3}, "MathVision": {"choice": 2, "math": 1}}
    assert summary["image_formats"] == {"PNG": 6, "JPEG": 3} and summary["images_per_row"] == {"1": 9}
    assert summary["verifier_resolution"]["MathVision"] == {"row options": 2, "benchmark": 1}
    assert summary["report"]["rows_ok"] == 9 and summary["image_width"] == [48, 80]

    out = tmp_path / "suite.parquet"
    assert main(["data", "convert", *files, "--source", "MathVision", "--out", str(out)]) == 0
    assert "wrote 9 rows" in capsys.readouterr().out
    rows = load_rows(out)[0]
    assert [(r.source, r.kind) for r in rows] == [("fvqa", "em")] * 3 + [("vstar", "choice")] * 3 + [
        ("MathVision", "choice"), ("MathVision", "math"), ("MathVision", "choice")]


def test_data_convert_bad_rows_stop_or_are_counted_and_overrides_apply(tmp_path, capsys):
    bad = str(sd.bad_jsonl(tmp_path / "b"))
    out = tmp_path / "o.parquet"
    assert main(["data", "convert", bad, "--out", str(out)]) == 2
    assert "bad.jsonl, line 2: image 0: image file not found" in capsys.readouterr().err and not out.exists()
    assert main(["data", "convert", bad, "--out", str(out), "--skip-bad", "--verifier", "mystery-bench=em"]) == 0
    text = capsys.readouterr().out
    assert "wrote 2 rows" in text and "2 of 10 rows loaded; 8 skipped" in text and "line 3:" in text
    assert sorted((r.source, r.kind) for r in load_rows(out)[0]) == [("mystery-bench", "em"), ("vstar", "choice")]


EVAL = ["--n", "4", "--k", "4", "--max-tokens-per-turn", "12", "--max-turns", "2", "--tools", "crop", "--threads", "1",
        "--max-concurrency", "4", "--no-progress"]


def test_eval_the_tiny_model_on_three_benchmarks_interrupted_then_resumed(files, model_dir, tmp_path, monkeypatch, capsys):
    import axpo_rllm.train.eval_run as eval_run

    args = ["eval", *files, "--source", "MathVision", "--model-dir", str(model_dir), *EVAL]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert set(whole["scores"]["by_benchmark"]) == {"fvqa", "vstar", "MathVision"} and whole["samples"] == 36
    assert whole["scores"]["average"]["benchmarks"] == 3 and whole["resumed_samples"] == 0
    table = (tmp_path / "whole" / "results.md").read_text()
    assert all(f"| {name} | 3 |" in table for name in ("fvqa", "vstar", "MathVision")) and "| all questions | 9 |" in table
    assert capsys.readouterr().out.count("| MathVision | 3 |") == 1

    real = eval_run.build_engine
    monkeypatch.setattr(eval_run, "build_engine", lambda *a, **kw: Interrupting(real(*a, **kw), after=14))
    assert main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    kept = (tmp_path / "cut" / "samples.jsonl").read_text().splitlines()
    assert 0 < len(kept) < 36
    monkeypatch.setattr(eval_run, "build_engine", real)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["resumed_samples"] == len(kept) and resumed["scores"]["by_benchmark"] == whole["scores"]["by_benchmark"]
    assert sorted((tmp_path / "cut" / "samples.jsonl").read_text().splitlines()) == sorted(
        (tmp_path / "whole" / "samples.jsonl").read_text().splitlines())

    assert main(args + ["--out", str(tmp_path / "whole"), "--temperature", "0.5"]) == 2
    assert "changed: agent" in capsys.readouterr().err


def test_record_then_sft_export_and_filter(files, model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    import axpo_rllm.train.eval_run as eval_run
    from axpo_rllm.data.writers import read_sft_parquet

    monkeypatch.setattr(eval_run, "build_engine", lambda *a, **kw: ScriptedEngine(tokenizer, suite_reply))
    rec = tmp_path / "rec"
    assert main(["eval", *files, "--source", "MathVision", "--model-dir", str(model_dir), "--out", str(rec), "--record", *EVAL,
                 "--max-tokens-per-turn", "64"]) == 0  # room for the whole crop call
    samples = [json.loads(line) for line in (rec / "samples.jsonl").read_text().splitlines()]
    solved = {(s["benchmark"], s["task_id"]) for s in samples if s["correct"]}
    c = sum(s["correct"] for s in samples if (s["benchmark"], s["task_id"]) == ("MathVision", "1"))
    capsys.readouterr()

    sft = tmp_path / "sft.parquet"
    assert main(["data", "sft-export", str(rec), *files, "--source", "MathVision", "--out", str(sft)]) == 0
    assert f"exported {12 + c} trajectories of {3 + (c > 0)} questions; left out" in capsys.readouterr().out
    rows = read_sft_parquet(sft)
    assert len(rows) == 12 + c and all(r["tools"][0]["function"]["name"] == "crop" for r in rows)
    assert {len(r["images"]) for r in rows if r["data_source"] == "MathVision" and r["task_id"] != "1"} == {2}

    # The same recording as SFT model and teacher: solved 4/4 -> dropped; never solved -> dropped.
    out = tmp_path / "filtered.parquet"
    assert main(["data", "filter", *files, "--source", "MathVision", "--sft", str(rec), "--teacher", str(rec), "--out", str(out)]) == 0
    kept = {(r.source, r.task_id) for r in load_rows(out)[0]}
    assert kept == ({("MathVision", "1")} if 0 < c < 4 else set())
    assert f"the SFT model solves 4/4 and {9 - len(solved)} the teacher fails 4/4" in capsys.readouterr().out
    assert main(["data", "filter", *files, "--sft", str(rec), "--teacher", str(tmp_path / "nothing"), "--out", str(out)]) == 2


class _TokenServer(BaseHTTPRequestHandler):
    """Stands in for vLLM's /inference/v1/generate: answers every V* question with A, token ids in, token ids out."""

    tokenizer = None
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        ids = self.tokenizer.encode("\\boxed{A}", add_special_tokens=False) + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        reply = {"choices": [{"token_ids": ids, "finish_reason": "stop",
                              "logprobs": {"content": [{"token_id": t, "logprob": -0.5} for t in ids]}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_eval_over_http(suite, model_dir, tokenizer, tmp_path):
    _TokenServer.tokenizer, _TokenServer.bodies = tokenizer, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["eval", str(suite["vstar"]), "--engine", "http", "--base-url", url, "--model-dir", str(model_dir),
                     "--out", str(tmp_path / "http"), "--limit", "2", *EVAL]) == 0
    finally:
        server.shutdown()
    scores = json.loads((tmp_path / "http" / "results.json").read_text())["scores"]
    assert scores["by_benchmark"]["vstar"]["pass@1"] == pytest.approx(1 / 2) and scores["eval/questions"] == 2  # --limit 2
    assert len(_TokenServer.bodies) == 8 and all(len(b["content_parts"]) == 1 for b in _TokenServer.bodies)
    assert all(b["token_ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1 for b in _TokenServer.bodies)
    assert main(["eval", str(suite["vstar"]), "--engine", "http", "--model-dir", str(model_dir), "--out", str(tmp_path / "x")]) == 2


def test_eval_refuses_bad_settings_and_counts_questions_that_cannot_load(suite, model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import axpo_rllm.train.eval_run as eval_run

    rows = [{"data_source": "vstar", "question": f"What is the color of the box {i}?", "answer": "A", "id": str(i),
             "images": [{"bytes": data, "path": None}]} for i, data in enumerate((sd.png(), sd.truncated_png()))]
    path = tmp_path / "half.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    base = ["eval", str(path), "--model-dir", str(model_dir), *EVAL]
    assert main(base + ["--out", str(tmp_path / "e0"), "--tools", "crop,teleport"]) == 2
    assert "no tool named ['teleport']" in capsys.readouterr().err
    assert main(["eval", str(path), "--model-dir", str(tmp_path / "no-model"), "--out", str(tmp_path / "e1"), *EVAL]) == 2
    capsys.readouterr()

    monkeypatch.setattr(eval_run, "build_engine", lambda *a, **kw: ScriptedEngine(tokenizer, suite_reply))
    assert main(base + ["--out", str(tmp_path / "e2")]) == 2  # the header reads; the body does not
    assert "half.parquet, row 1: image 0: image bytes cannot be decoded" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "e3"), "--skip-bad"]) == 0
    result = json.loads((tmp_path / "e3" / "results.json").read_text())
    assert result["scores"]["eval/questions"] == 1 and result["scores"]["eval/skipped_questions"] == 1
    assert "row 1: image 0" in result["skipped_questions"][0][2] and result["scores"]["by_benchmark"]["vstar"]["pass@1"] == 1.0

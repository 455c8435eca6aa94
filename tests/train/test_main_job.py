"""The embedded job: config layering, and the whole pipeline end to end (``--smoke``)."""

from __future__ import annotations

import json
import time

import pytest

from axpo_rllm.cli import build_parser
from axpo_rllm.configs.loader import axpo_config
from axpo_rllm.demo.main_job import job_config


def test_layers_smoke_steps_and_overrides():
    cfg = job_config("rollout_2x", ["rl.lr=1e-3", "algorithm.axpo.k=2"], smoke=True, steps=3)
    assert cfg.rl.steps == 3 and cfg.rl.lr == 1e-3 and cfg.sft.max_steps <= 5
    assert cfg.actor_rollout_ref.rollout.n == 8  # the ablation's 2N survives (halved by --smoke)
    assert axpo_config(cfg).k == 2 and not axpo_config(cfg).enable
    assert cfg.job.ablation == "rollout_2x" and cfg.job.smoke
    full = job_config()
    assert full.actor_rollout_ref.rollout.n == 8 and full.algorithm.adv_estimator == "axpo" and full.sft.minutes >= 2
    with pytest.raises(ValueError):
        job_config(None, ["algorithm.axpo.ranking=best"])


def test_cli_main_flags():
    args = build_parser().parse_args(["main", "--smoke", "--ablation", "grpo", "--steps", "2", "eval.k=4"])
    assert args.smoke and args.ablation == "grpo" and args.steps == 2 and args.overrides == ["eval.k=4"]


@pytest.mark.slow
def test_smoke_runs_the_whole_pipeline(tmp_path, monkeypatch):
    """Tiny model built offline -> tasks -> SFT -> eval -> one AXPO step -> eval -> summary."""
    from axpo_rllm.cli import main

    monkeypatch.setenv("AXPO_TINY_MODEL_CACHE", str(tmp_path / "models"))  # a fresh machine: build everything
    started = time.perf_counter()
    assert main(["main", "--smoke", "--run-dir", str(tmp_path / "runs")]) == 0
    # About 45-75 s on an idle 2-core machine; the bound leaves room for a loaded CI box.
    assert time.perf_counter() - started < 240
    (run,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["smoke"] and summary["rl"]["steps"] == 1
    assert summary["sft"]["heldout_loss_after"] < summary["sft"]["heldout_loss_before"]
    for key in ("eval/pass@1", "eval/pass@4", "eval/tool_use_rate"):
        assert 0.0 <= summary["eval_before"][key] <= 1.0 and 0.0 <= summary["eval_after"][key] <= 1.0
    assert summary["eval_before"]["eval/failed_rollouts"] == 0
    (line,) = (run / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["workflow/failed_rollouts"] == 0 and metrics["actor/loss_tokens"] > 0
    assert "axpo/budget" in metrics and "actor/kl_loss" in metrics

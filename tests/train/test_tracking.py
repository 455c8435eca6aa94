"""Experiment tracking through verl's Tracking: backends from trainer.logger, verl's metric names,
TensorBoard event files written where we say and readable by TensorBoard's own reader."""

from __future__ import annotations

import json

import pytest

from axpo_rllm.train.tracking import StepTracker, eval_metrics, tracking_backends, train_metrics

pytest.importorskip("verl")


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``folder``'s event files, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_backends_follow_trainer_logger_console_is_ours_and_unknown_names_fail():
    assert tracking_backends(None)[0] == ["tensorboard"]  # default: our console line + event files
    assert tracking_backends(["console", "tensorboard", "wandb"])[0] == ["tensorboard", "wandb"]
    assert tracking_backends("console")[0] == []
    with pytest.raises(ValueError, match="tensorbord.*supports"):
        tracking_backends(["console", "tensorbord"])


def test_tensorboard_missing_is_a_note_not_a_failure(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    backends, notes = tracking_backends(["console", "tensorboard"])
    assert backends == [] and "tensorboard is not installed" in notes[0]


def test_metric_names_are_verls():
    step = {"step": 3.0, "train/reward_mean": 0.5, "timing/step_s": 2.0, "timing/rollout_s": 1.5,
            "timing/update_s": 0.5, "actor/kl_loss": 1e-3, "axpo/recovery_rate": None,
            "axpo/tool_use_rate": float("nan"), "axpo/budget": 8, "axpo/enabled": True}
    assert train_metrics(step) == {"critic/score/mean": 0.5, "timing_s/step": 2.0, "timing_s/gen": 1.5,
                                   "timing_s/update_actor": 0.5, "actor/kl_loss": 1e-3, "axpo/budget": 8.0}
    assert eval_metrics({"eval/pass@1": 0.5, "eval/pass@4": 0.7, "eval/tool_use_rate": 0.3,
                         "eval/crop/pass@1": 0.2}, "synthetic") == {
        "val-core/synthetic/pass@1": 0.5, "val-core/synthetic/pass@4": 0.7,
        "val-aux/synthetic/tool_use_rate": 0.3, "val-core/synthetic/crop/pass@1": 0.2}


def test_step_tracker_writes_event_files_and_the_file_log_where_told(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # verl's defaults would land here: nothing may
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    tb, jsonl = tmp_path / "run" / "tensorboard" / "axpo" / "seed0", tmp_path / "run" / "tracking.jsonl"
    with StepTracker(["tensorboard", "file"], "axpo-rllm", "run/axpo/seed0", tb, jsonl, config={"trainer": {}}) as t:
        t.log(train_metrics({"axpo/recovery_rate": 0.25, "train/reward_mean": 0.5}), 1)
        t.log(train_metrics({"axpo/recovery_rate": 0.75, "train/reward_mean": 0.6}), 2)
        t.log(eval_metrics({"eval/pass@1": 0.4}, "synthetic"), 2)
    scalars = read_scalars(tb)
    assert [(s, round(v, 6)) for s, v in scalars["axpo/recovery_rate"]] == [(1, 0.25), (2, 0.75)]
    assert [s for s, _ in scalars["critic/score/mean"]] == [1, 2]
    assert scalars["val-core/synthetic/pass@1"][0][0] == 2
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records[0] == {"step": 1, "data": {"axpo/recovery_rate": 0.25, "critic/score/mean": 0.5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert "TENSORBOARD_DIR" not in __import__("os").environ


def test_console_only_tracks_nothing(tmp_path):
    with StepTracker([], "p", "e", tmp_path / "tb", tmp_path / "t.jsonl") as t:
        t.log({"axpo/budget": 1.0}, 1)
    assert list(tmp_path.iterdir()) == []

"""Experiment tracking through verl's own ``verl.utils.tracking.Tracking``.

The keys are verl's: ``trainer.logger`` (backends: ``console``, ``tensorboard``, ``wandb``,
``mlflow``, ``file``, ...), ``trainer.project_name``, ``trainer.experiment_name``. Metric names
follow verl's where verl has one (``actor/*`` as they are; timings as ``timing_s/*``; the
reward as ``critic/score/mean``; held-out evaluation as ``val-core/<data_source>/...`` and
``val-aux/<data_source>/...``); AXPO's own diagnostics keep their ``axpo/*`` and ``workflow/*`` names.

Every backend writes into a folder the caller names (TensorBoard event files, the ``file``
backend's jsonl), not verl's defaults relative to the working directory. ``console`` is the
caller's own short per-step line: verl's console backend prints every metric of a step on one
line, hundreds of columns wide.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["DEFAULT_LOGGER", "StepTracker", "eval_metrics", "scoped_environ", "tracking_backends", "train_metrics"]

DEFAULT_LOGGER = ("console", "tensorboard")
"""``trainer.logger`` when a config names none: our step lines + TensorBoard event files."""

VERL_NAMES = {
    "train/reward_mean": "critic/score/mean",
    "timing/rollout_s": "timing_s/gen",
    "timing/update_s": "timing_s/update_actor",
    "timing/step_s": "timing_s/step",
}
"""Our trainer's names -> the names verl's trainer logs the same quantity under."""

CORE_EVAL = ("pass@",)
"""Eval metrics verl would call core (its ``val-core`` group): accuracy figures; the rest is aux."""


def tracking_backends(logger: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``trainer.logger`` -> (backends handed to verl's ``Tracking``, notes for the user).

    ``console`` is left out (the caller prints its own compact line); ``tensorboard`` is dropped
    with a note when the ``tensorboard`` package is missing (it is optional outside verl's stack).
    An unknown backend is an error naming verl's list.
    """
    from verl.utils.tracking import Tracking  # verl is the tracking backend; imported when a run starts

    names = list(DEFAULT_LOGGER) if logger is None else [logger] if isinstance(logger, str) else list(logger)
    unknown = [n for n in names if n not in Tracking.supported_backend]
    if unknown:
        raise ValueError(f"trainer.logger: unknown backend(s) {unknown}; "
                         f"verl's Tracking supports {', '.join(Tracking.supported_backend)}")
    notes = []
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        names.remove("tensorboard")
        notes.append("tensorboard is not installed: no event files (pip install tensorboard)")
    return [n for n in names if n != "console"], notes


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric entries only (a backend plots scalars); None or NaN (nothing to count this step,
    e.g. a recovery rate with no selected prefix) left out rather than plotted as a gap value."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)}


def train_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """One RL step's metrics under verl's names (the step number itself is the logging step)."""
    return {VERL_NAMES.get(k, k): v for k, v in _numbers(metrics).items() if k != "step"}


def eval_metrics(metrics: Mapping[str, Any], data_source: str) -> dict[str, float]:
    """``eval/<name>`` -> ``val-core/<data_source>/<name>`` (Pass@k) or ``val-aux/...`` (the rest)."""
    out = {}
    for key, value in _numbers(metrics).items():
        name = key.split("/", 1)[1] if key.startswith("eval/") else key
        group = "val-core" if name.rsplit("/", 1)[-1].startswith(CORE_EVAL) else "val-aux"
        out[f"{group}/{data_source}/{name}"] = value
    return out


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` inside the block, the previous values (or absence) after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StepTracker:
    """verl's ``Tracking`` for one training run.

    TensorBoard event files go to ``tensorboard_dir``, the ``file`` backend's records to
    ``file_path`` (verl's defaults are relative to the working directory). Without backends
    (``trainer.logger=[console]``) it does nothing.
    """

    def __init__(self, backends: Sequence[str], project: str, experiment: str, tensorboard_dir: str | Path,
                 file_path: str | Path, config: Mapping[str, Any] | None = None) -> None:
        self.backends = list(backends)
        self._tracking = None
        if not self.backends:
            return
        from verl.utils.tracking import Tracking

        Path(file_path).parent.mkdir(parents=True, exist_ok=True)
        env = {"TENSORBOARD_DIR": str(tensorboard_dir), "VERL_FILE_LOGGER_PATH": str(file_path)}
        # verl's adapters print where they write; the caller reports it once for the whole run.
        with scoped_environ(env), contextlib.redirect_stdout(io.StringIO()):
            self._tracking = Tracking(project_name=project, experiment_name=experiment,
                                      default_backend=self.backends, config=dict(config or {}))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._tracking is not None and metrics:
            self._tracking.log(data=dict(metrics), step=int(step))

    def close(self) -> None:
        if self._tracking is not None:
            self._tracking.finish()
            self._tracking = None

    def __enter__(self) -> "StepTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

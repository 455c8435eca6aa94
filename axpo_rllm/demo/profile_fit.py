"""A step profile calibrated from the engine's own trace of a run (``bench_workflow.py --trace``).

Why: the engine's step costs more inside a rollout step than alone. ``bench_step_profile.py``
times ``llm_engine.step()`` with nothing else running; inside ``bench_workflow.py`` the same call
shares the interpreter with the agents' event loop (the GIL), admits requests with images, keeps
log-probs and stop strings, and measured 2-3x the isolated step at the same number of sequences
(docs/time_model.md). A model driven by the isolated profile reproduces a step only by luck; one
driven by the trace of the step's own GRPO arm describes the engine as the workflow found it.

The fit, top to bottom (every step of the trace is ``TracedStep``):

1. ``decode(s)``: steps that only decode (each request one token, none new), grouped by s into
   bins doubling in width (1, 2, 3-4, 5-8, ...); each bin gives one table point, the mean s and
   the *mean* step time (the model adds step times up, so a rare slow step counts in full).
2. Prompt and admission: for the steps that admit new requests, the time beyond ``decode(s)`` is
   fitted as ``p * prefill_token_s + n * request_step_s`` (least squares, both >= 0), p the
   prompt tokens computed, n the new requests.
3. ``request_s`` = the mean time of the backend's ``add`` (vLLM's input processing, on the engine
   thread, between two steps) + ``request_step_s``: what one new request costs the engine thread.

The context cost is left at zero: the decode bins already carry the run's own contexts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from axpo_rllm.demo.time_model import StepProfile

__all__ = ["TracedStep", "ProfileFit", "fit_profile", "traced_steps"]


@dataclass(frozen=True)
class TracedStep:
    """One ``llm_engine.step()``: seconds, requests scheduled, tokens scheduled, new requests."""

    seconds: float
    requests: int
    tokens: int
    new: int

    @property
    def prompt_tokens(self) -> int:
        """Tokens beyond one per running request that is not new: the new requests' prompts."""
        return max(0, self.tokens - (self.requests - self.new))


def traced_steps(rows: Iterable[Sequence[float]]) -> list[TracedStep]:
    """``bench_workflow.py``'s trace rows ``(start, seconds, requests, tokens, new)`` -> steps that
    computed something (an empty step only returns finished outputs)."""
    steps = []
    for row in rows:
        if len(row) < 5:
            raise ValueError(f"a trace step needs (start, seconds, requests, tokens, new), got {list(row)}")
        step = TracedStep(float(row[1]), int(row[2]), int(row[3]), int(row[4]))
        if step.tokens > 0:
            steps.append(step)
    return steps


@dataclass(frozen=True)
class ProfileFit:
    profile: StepProfile
    decode_steps: int
    admit_steps: int
    add_s: float
    """Mean seconds of one backend ``add`` (input processing)."""
    request_step_s: float
    """Fitted seconds per new request inside the step that admits it."""


def _bins(max_s: int) -> list[tuple[int, int]]:
    """(lo, hi] ranges 0-1, 1-2, 2-4, 4-8, ... up to ``max_s``."""
    edges, hi = [0, 1], 1
    while hi < max_s:
        hi *= 2
        edges.append(hi)
    return list(zip(edges[:-1], edges[1:]))


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (two columns: try both, then each alone)."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y ** 2))
    subsets = [list(range(x.shape[1]))] + [[j] for j in range(x.shape[1])]
    for cols in subsets:
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if np.any(coef < 0):
            continue
        full = np.zeros(x.shape[1])
        full[cols] = coef
        err = float(np.sum((y - x @ full) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


def fit_profile(steps: Sequence[TracedStep], add_seconds: Sequence[float], name: str, source: str = "",
                min_per_bin: int = 5) -> ProfileFit:
    """The step profile of ``steps`` (and the backend's ``add`` times): see the module docstring."""
    decode = [s for s in steps if s.new == 0 and s.tokens == s.requests]
    if not decode:
        raise ValueError("the trace has no decode-only step: nothing to fit decode(s) on")
    points: list[tuple[int, float]] = []
    for lo, hi in _bins(max(s.requests for s in decode)):
        inside = [s for s in decode if lo < s.requests <= hi]
        if len(inside) < min_per_bin:
            continue
        seqs = int(round(statistics.fmean(s.requests for s in inside)))
        if points and seqs <= points[-1][0]:
            continue
        points.append((seqs, statistics.fmean(s.seconds for s in inside)))
    if not points:
        raise ValueError(f"no bin of decode-only steps has {min_per_bin} steps or more ({len(decode)} steps)")
    table = StepProfile(name=name, seqs=tuple(p[0] for p in points), decode_s=tuple(p[1] for p in points))
    admit = [s for s in steps if s.new > 0]
    prefill_token_s = request_step_s = 0.0
    if admit:
        x = np.array([[s.prompt_tokens, s.new] for s in admit], dtype=float)
        y = np.array([s.seconds - table.decode_time(s.requests) for s in admit])
        prefill_token_s, request_step_s = (float(c) for c in _nonnegative_lstsq(x, y))
    add_s = statistics.fmean(add_seconds) if add_seconds else 0.0
    if not math.isfinite(add_s) or add_s < 0:
        raise ValueError(f"add times must be finite and >= 0, got mean {add_s}")
    profile = StepProfile(name=name, seqs=table.seqs, decode_s=table.decode_s, prefill_token_s=prefill_token_s,
                          request_s=add_s + request_step_s, source=source)
    return ProfileFit(profile, len(decode), len(admit), add_s, request_step_s)

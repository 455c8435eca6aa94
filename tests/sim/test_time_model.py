"""The time model on steps small enough to work out by hand (axpo_rllm/demo/time_model.py)."""

from __future__ import annotations

import json

import pytest

from axpo_rllm.demo import time_model as tm
from axpo_rllm.demo import time_tables as tt
from axpo_rllm.demo.time_model import Plan, StepProfile, Turn, Workload

TICK = 0.01
FLAT = StepProfile("flat", seqs=(1,), decode_s=(TICK,))
"""Every step costs one tick, whatever runs in it (a memory-bound engine)."""
LINEAR = StepProfile("linear", seqs=(1, 2), decode_s=(TICK, 2 * TICK))
"""A step costs one tick per running sequence (a compute-bound engine)."""


def no_wait(**changes) -> Workload:
    """Fixed-length turns, no tool latency, no agent overhead: only engine steps take time."""
    base = dict(turn_sigma=0.0, turn_min=1, tool_s=0.0, turn_overhead_s=0.0, cache_hit=1.0, prompt_tokens=20)
    return Workload.paper(**{**base, **changes})


def engine_finish_times(profile: StepProfile, requests: list[tuple[float, int]]) -> list[float]:
    """Submit (arrival time, tokens) requests to one engine; when does each finish?"""
    clock = tm._Clock()
    engine = tm.Engine(profile, clock)
    done: dict[int, float] = {}
    for i, (at, tokens) in enumerate(requests):
        req = tm._Request(Turn(prefill=0, decode=tokens, context=0, then="answer"), lambda now, i=i: done.setdefault(i, now))
        clock.at(at, lambda req=req: engine.submit(req))
    clock.run()
    return [done[i] for i in range(len(requests))]


# -- the engine ----------------------------------------------------------------------------------
def test_one_sequence_takes_one_step_per_token():
    assert engine_finish_times(FLAT, [(0.0, 7)]) == pytest.approx([7 * TICK])


def test_one_sequence_pays_its_prompt_in_its_first_step():
    profile = StepProfile("p", seqs=(1,), decode_s=(TICK,), prefill_token_s=1e-4)
    w = no_wait(tool_rate=0.0, turn_median=12)
    t = tm.run_step(w, profile, "grpo", questions=1, n=1, k=1, r=1.0)
    assert t.step_s == pytest.approx(12 * TICK + 20 * 1e-4)  # 12 steps, the first with 20 prompt tokens
    assert (t.phase1_s, t.decoded_phase1, t.continuations) == (t.step_s, 12, 0)


def test_two_sequences_on_a_flat_profile_overlap_for_free():
    assert engine_finish_times(FLAT, [(0.0, 10), (0.0, 30)]) == pytest.approx([10 * TICK, 30 * TICK])


def test_two_sequences_on_a_linear_profile_share_the_engine():
    # 10 steps with both (2 ticks each), then 20 steps alone (1 tick each)
    assert engine_finish_times(LINEAR, [(0.0, 10), (0.0, 30)]) == pytest.approx([20 * TICK, 40 * TICK])


def test_a_request_joins_at_the_next_step_boundary():
    # arrives at 5.5 ticks, mid-step: its first step starts at 6 ticks
    assert engine_finish_times(FLAT, [(0.0, 30), (5.5 * TICK, 4)]) == pytest.approx([30 * TICK, 10 * TICK])
    # on a linear profile the long one slows while the newcomer runs: 6 + 4*2 + (30-6-4) = 34 ticks
    assert engine_finish_times(LINEAR, [(0.0, 30), (5.5 * TICK, 4)]) == pytest.approx([34 * TICK, 14 * TICK])


def test_context_cost_grows_step_by_step():
    profile = StepProfile("ctx", seqs=(1,), decode_s=(TICK,), context_token_s=1e-4)
    clock = tm._Clock()
    engine = tm.Engine(profile, clock)
    done = []
    engine.submit(tm._Request(Turn(prefill=0, decode=3, context=100, then="answer"), done.append))
    clock.run()
    assert done == pytest.approx([3 * TICK + (100 + 101 + 102) * 1e-4])


# -- a hand-made step: barrier vs exact ------------------------------------------------------------
def hand_step(mode: str) -> tm.StepTiming:
    """B=2, N=1, K=1, r=1 (E = 2, S = 2 slots). q0's rollout: 10 tokens, a tool call, 10 tokens,
    wrong (a candidate); q1's: 100 tokens, no tool. A continuation: 20 tokens."""
    w = no_wait()
    q0 = Plan((Turn(0, 10, 20, "tool"), Turn(0, 10, 40, "answer")), 60, call_at=9, call_turn=0, correct=False,
              confidence=0.5)
    q1 = Plan((Turn(0, 100, 20, "answer"),), 100, call_at=None, call_turn=None, correct=False, confidence=0.5)
    cont = Plan((Turn(0, 20, 30, "answer"),), 30, call_at=9, call_turn=0, correct=False, confidence=0.5)
    return tm.run_step(w, FLAT, mode, questions=2, n=1, k=1, r=1.0, draw=lambda q, j: (q0, q1)[q],
                       draw_cont=lambda source, sid, i: cont)


def test_barrier_waits_for_the_slowest_rollout():
    grpo, barrier = hand_step("grpo"), hand_step("barrier")
    assert grpo.step_s == pytest.approx(100 * TICK)
    # q0 graded at 20 ticks, q1 at 100; the continuation runs 100 -> 120
    assert (barrier.phase1_s, barrier.step_s, barrier.continuations) == (pytest.approx(100 * TICK),
                                                                         pytest.approx(120 * TICK), 1)


def test_exact_starts_the_certain_prefix_inside_phase_1():
    # S = 2 > 1 question that could still outrank q0's prefix: certain when q0 is graded (20 ticks),
    # so the continuation runs 20 -> 40, hidden under q1's 100
    exact = hand_step("exact")
    assert exact.first_release_s == pytest.approx(20 * TICK)
    assert exact.step_s == pytest.approx(100 * TICK)
    assert exact.decoded_extra == 20
    assert (exact.jobs_early, hand_step("barrier").jobs_early) == (1, 0)  # started before q1 ended


def test_every_mode_sees_the_same_phase_1_and_continuations():
    w = Workload.bench(tool_s=0.0)
    runs = {m: tm.run_step(w, LINEAR, m, questions=8, n=4, k=2, r=0.25, seed=3) for m in ("grpo", "barrier", "exact")}
    assert len({t.decoded_phase1 for t in runs.values()}) == 1
    assert runs["barrier"].decoded_extra == runs["exact"].decoded_extra > 0  # same plan, same continuations
    assert runs["barrier"].phase1_s == pytest.approx(runs["grpo"].step_s)


def test_phase_table_puts_model_and_measured_side_by_side():
    modes = {"barrier": {"phase1": 1.0, "after_phase1": 0.5, "first_release": 1.0, "jobs_early": 0.0},
             "exact": {"phase1": 1.154, "after_phase1": 0.3, "first_release": 0.77, "jobs_early": 16.0}}
    measured = {"barrier": {"phase1": 1.02, "after_phase1": 0.52, "first_release": float("nan"), "jobs_early": 0},
                "exact": {"phase1": 1.36, "after_phase1": 0.24, "first_release": 0.8, "jobs_early": 16}}
    table = tt.format_phases([("a", tm.Comparison(32, modes, 2.6), measured),
                              ("b", tm.Comparison(16, modes, 2.6), {})]).splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    assert cells(table[2]) == ["32", "a", "barrier", "1.00 / 1.02", "0.50 / 0.52", "- / -", "0 / 0"]
    assert cells(table[3]) == ["32", "a", "exact", "1.15 / 1.36", "0.30 / 0.24", "0.77 / 0.80", "16 / 16"]
    assert cells(table[5])[:4] == ["16", "b", "exact", "1.15 / -"]  # a run that did not measure it


# -- profiles ------------------------------------------------------------------------------------
def test_profile_interpolates_and_extrapolates():
    p = StepProfile("t", seqs=(1, 4, 8), decode_s=(1.0, 2.0, 4.0))
    assert [p.decode_time(s) for s in (1, 2, 6, 12)] == pytest.approx([1.0, 4 / 3, 3.0, 6.0])


def test_profile_json_round_trip_and_errors(tmp_path):
    p = StepProfile("t", seqs=(1, 4), decode_s=(1.0, 2.0), prefill_token_s=0.1, source="here")
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"profile": p.to_json()}))
    assert tm.load_profile(str(path)) == p
    with pytest.raises(ValueError, match="unknown keys"):
        StepProfile.from_json({**p.to_json(), "bogus": 1})
    with pytest.raises(ValueError, match="increasing"):
        StepProfile("t", seqs=(4, 1), decode_s=(1.0, 2.0))
    with pytest.raises(ValueError, match="neither"):
        tm.load_profile("no-such-profile")


def test_gpu_profile_is_memory_bound_at_moderate_batch():
    p = tm.GPU_PROFILES["h100-8b"].profile()
    weights_s = 8.2e9 * 2 / (2 * 3.35e12 * 0.77)
    assert p.decode_time(1) == pytest.approx(0.002 + weights_s)
    assert p.decode_time(64) == p.decode_time(1)  # 64 tokens of compute hide under the weight read
    assert p.decode_time(512) > 1.5 * p.decode_time(1)  # compute-bound past the ridge


def test_whole_step_weighs_rollout_and_training():
    assert tm.whole_step(1.2, 1.3, 0.5) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="rollout_share"):
        tm.whole_step(1.2, 1.3, 0.0)


# -- the command line ----------------------------------------------------------------------------
def test_cli_prints_the_scale_table(capsys):
    from axpo_rllm.cli import main

    assert main(["simulate", "--time", "h100-2b", "--questions", "8", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "E = 16 continuations" in out
    assert all(f"| 8 | {mode}" in " ".join(out.split()) for mode in tt.SCALE_MODES)


def test_cli_names_a_bad_profile(capsys):
    from axpo_rllm.cli import main

    assert main(["simulate", "--time", "no-such-gpu"]) == 2
    assert "neither one of" in capsys.readouterr().err


def test_a_new_request_pays_its_admission_once():
    # request_s is paid in the step that admits a request: two arriving together pay it twice
    # in that one step, and nothing after it
    profile = StepProfile("adm", seqs=(1,), decode_s=(TICK,), request_s=0.5 * TICK)
    assert engine_finish_times(profile, [(0.0, 5)]) == pytest.approx([5 * TICK + 0.5 * TICK])
    assert engine_finish_times(profile, [(0.0, 5), (0.0, 8)]) == pytest.approx([6 * TICK, 9 * TICK])
    # a newcomer at 3.7 ticks joins the step at 4.5 (1.5 + 1 + 1 + 1), which costs 1.5 ticks for
    # both; the newcomer ends one step later (7.0), the first one after 4 more (11.0)
    assert engine_finish_times(profile, [(0.0, 10), (3.7 * TICK, 2)]) == pytest.approx([11 * TICK, 7 * TICK])

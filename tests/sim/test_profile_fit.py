"""The step profile calibrated from an engine trace (axpo_rllm/demo/profile_fit.py) and the
validation on a traced benchmark run (axpo_rllm/demo/time_tables.py)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from axpo_rllm.demo import time_model as tm
from axpo_rllm.demo import time_tables as tt
from axpo_rllm.demo.profile_fit import TracedStep, fit_profile, traced_steps

DECODE = lambda s: 0.010 + 0.0005 * s  # noqa: E731  (a linear engine: every point is exact)
PROMPT_S, NEW_S, ADD_S = 2e-5, 1e-3, 2e-3


def synthetic_trace(seed: int = 0, steps: int = 1200) -> tuple[list[list[float]], list[list[float]]]:
    """Trace rows as bench_workflow.py writes them, from the engine above: decode-only steps at
    1..64 sequences, and steps admitting 1-4 new requests with their prompts."""
    rng = random.Random(seed)
    rows, adds, t = [], [], 0.0
    for _ in range(steps):
        s = rng.randint(1, 64)
        new = rng.choice([0, 0, 0, rng.randint(1, min(4, s))])
        prompt = sum(rng.randint(20, 400) for _ in range(new))
        seconds = DECODE(s) + PROMPT_S * prompt + NEW_S * new
        rows.append([t, seconds, s, (s - new) + prompt, new])
        adds += [[t, ADD_S]] * new
        t += seconds
    rows.append([t, 0.001, 0, 0, 0])  # an empty step (finished outputs only) is not fitted
    return rows, adds


def test_the_fit_recovers_a_known_engine():
    rows, adds = synthetic_trace()
    fit = fit_profile(traced_steps(rows), [a[1] for a in adds], name="t")
    p = fit.profile
    # bins (0,1], (1,2], (2,4], ..., (32,64]: each point is its bin's mean s and mean time
    assert p.seqs[0] == 1 and p.seqs[-1] > 32 and len(p.seqs) == 7
    assert all(t == pytest.approx(DECODE(s), abs=2.5e-4) for s, t in zip(p.seqs, p.decode_s))  # s rounded
    assert p.prefill_token_s == pytest.approx(PROMPT_S, rel=0.02)
    assert (fit.add_s, fit.request_step_s) == (pytest.approx(ADD_S), pytest.approx(NEW_S, rel=0.1))
    assert p.request_s == pytest.approx(ADD_S + NEW_S, rel=0.05)
    assert fit.decode_steps + fit.admit_steps == len(rows) - 1


def test_the_fit_takes_the_mean_of_a_bin_so_slow_steps_count_in_full():
    steps = [TracedStep(0.010, 1, 1, 0)] * 9 + [TracedStep(0.100, 1, 1, 0)]
    assert fit_profile(steps, [], name="t").profile.decode_s == pytest.approx((0.019,))


def test_the_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="no decode-only step"):
        fit_profile([TracedStep(0.02, 2, 300, 1)], [], name="t")
    with pytest.raises(ValueError, match="5 steps or more"):
        fit_profile([TracedStep(0.01, 1, 1, 0)] * 4, [], name="t")
    with pytest.raises(ValueError, match="needs"):
        traced_steps([[0.0, 0.01, 1, 1]])


def bench_run(tmp_path, ratios: dict[str, list[float]], questions: int = 4):
    """A traced run in bench_workflow.py's JSON layout (the fields load_run reads)."""
    repeats = []
    for i in range(len(ratios["barrier"])):
        rows, adds = synthetic_trace(seed=i)
        row = {"grpo_step_s": 2.0, "traces": {"grpo": {"steps": rows, "adds": adds}}}
        for mode, values in ratios.items():
            early = mode != "barrier"  # the barrier starts nothing before phase 1 ends
            row[mode] = {"ratio": values[i], "step_s": 2.0 * values[i], "phase1_s": 2.0,
                         "after_phase1_s": 2.0 * values[i] - 2.0,
                         "first_release_s": 1.0 if early else float("nan"), "jobs_early": 2 if early else 0}
        repeats.append(row)
    args = {"questions": questions, "n": 4, "k": 2, "r": 0.25, "median_turn": 24, "sigma": 0.8,
            "max_tokens_per_turn": 128, "tool_rate": 0.3, "accuracy": 0.3}
    path = tmp_path / f"run{questions}.json"
    path.write_text(json.dumps({"args": args, "repeats": repeats}))
    return path


def test_a_run_is_validated_with_the_profile_fitted_on_its_grpo_arms(tmp_path):
    ratios = {"barrier": [1.5, 1.7, 1.6], "exact": [1.4, 1.3, 1.2]}
    path = bench_run(tmp_path, ratios)
    run = tt.load_run(str(path))
    assert (run.questions, run.n, run.k, run.median("barrier"), run.median("exact")) == (4, 4, 2, 1.6, 1.3)
    assert run.phases["exact"]["first_release"] == [0.5, 0.5, 0.5]
    assert run.fit.profile.request_s == pytest.approx(ADD_S + NEW_S, rel=0.05)
    model = tt.validate_run(run, repeats=2)
    expected = tm.compare(run.workload, run.fit.profile, 4, ("barrier", "exact"), 4, 2, 0.25, repeats=2)
    assert model.modes["exact"]["ratio"] == expected.modes["exact"]["ratio"]
    table = tt.format_run_validation([(run, model)], tolerance=0.08).splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    row = cells(table[3])
    assert row[:3] == ["4", "run4", "exact"] and row[4:7] == ["1.30", "1.25 - 1.35", "3"]
    diff = model.modes["exact"]["ratio"] - 1.3
    assert row[7] == f"{diff:+.2f}" and row[8] == ("yes" if abs(diff) <= 0.08 else "NO")


@pytest.mark.parametrize("named", ["files", "folder"])
def test_the_command_line_validates_traced_runs(tmp_path, capsys, named):
    from axpo_rllm.cli import main

    paths = [bench_run(tmp_path, {"barrier": [1.5, 1.6], "greedy": [1.4, 1.4]}, questions=b) for b in (6, 4)]
    assert main(["simulate", "--time", ",".join(map(str, paths)) if named == "files" else str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert [line.split()[1] for line in lines if line.startswith(("| 4 |", "| 6 |"))][:4] == ["4", "4", "6", "6"]
    assert [line.split(" (")[0] for line in lines if line.startswith("B=")] == ["B=4", "B=6"]
    assert max(len(line) for line in out.splitlines()) <= 100
    barrier = [line for line in lines if line.startswith("| 4 | run4 | barrier |")]
    assert barrier and barrier[0].split(" | ")[4] == f"{statistics.median([1.5, 1.6]):.2f}"


def test_a_profile_json_is_not_taken_for_a_run(tmp_path, capsys):
    from axpo_rllm.cli import main

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"repeats": [{"grpo_step_s": 1.0}], "args": {}}))
    assert main(["simulate", "--time", str(path)]) == 2
    assert "not a traced bench_workflow.py run" in capsys.readouterr().err


def test_a_folder_without_runs_is_named(tmp_path, capsys):
    from axpo_rllm.cli import main

    assert main(["simulate", "--time", str(tmp_path)]) == 2
    assert "it has none" in capsys.readouterr().err
    (tmp_path / "profile.json").write_text(json.dumps({"profile": {}}))
    assert main(["simulate", "--time", str(tmp_path)]) == 2
    assert "these are not runs: profile.json" in capsys.readouterr().err


def test_a_run_without_its_sizes_is_named(tmp_path, capsys):
    from axpo_rllm.cli import main

    path = bench_run(tmp_path, {"barrier": [1.5]})
    data = json.loads(path.read_text())
    del data["args"]["median_turn"]
    path.write_text(json.dumps(data))
    assert main(["simulate", "--time", str(path)]) == 2
    assert "has 'median_turn'; this file has not" in capsys.readouterr().err


def test_the_committed_runs_are_reproduced_within_the_issue_tolerance():
    """docs/time_model.md's validation table, from the traced runs in benchmarks/measured/: the
    model, its profile calibrated on each run's GRPO arms, within 0.08 of every AXPO arm's median."""
    paths = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "measured").glob("workflow_b*.json"))
    runs = [tt.load_run(str(p)) for p in paths]
    assert sorted(run.questions for run in runs) == [16, 16, 32, 32, 64, 64]
    for run in runs:
        model = tt.validate_run(run)
        assert set(model.modes) == {"barrier", "exact", "greedy"}
        for mode, m in model.modes.items():
            assert abs(m["ratio"] - run.median(mode)) <= 0.08, (run.questions, mode, m["ratio"], run.median(mode))


def test_two_runs_of_one_size_keep_their_own_figures(tmp_path, capsys):
    from axpo_rllm.cli import main

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    bench_run(tmp_path / "a", {"barrier": [1.5, 1.5]}).rename(tmp_path / "run4_a.json")
    path = bench_run(tmp_path / "b", {"barrier": [1.9, 1.9]})
    data = json.loads(path.read_text())
    for row in data["repeats"]:
        row["barrier"]["after_phase1_s"] = 0.4  # 0.20 of GRPO's 2 s step; run a's is 1.0 s (0.50)
    path.write_text(json.dumps(data))
    path.rename(tmp_path / "run4_b.json")
    assert main(["simulate", "--time", f"{tmp_path / 'run4_a.json'},{tmp_path / 'run4_b.json'}"]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 4 ")]
    ratios = {r[1]: r[4] for r in rows if len(r) == 9}
    phases = {r[1]: r[4].split(" / ")[1] for r in rows if len(r) == 7}  # after phase 1, measured
    assert ratios == {"run4_a": "1.50", "run4_b": "1.90"}
    assert phases == {"run4_a": "0.50", "run4_b": "0.20"}

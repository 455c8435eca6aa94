"""The signal-yield simulator: calibration, the strategies' mechanics, the metrics, determinism."""

import dataclasses

import numpy as np
import pytest

from axpo_rllm.demo import simulator as sim
from axpo_rllm.core.advantages import build_training_rows
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import check_continuations, confidence
from axpo_rllm.cli import main
from axpo_rllm.core.records import QuestionGroup, RolloutKind
from synthetic_rollouts import make_rollout

SMALL = sim.SimConfig(questions=32, steps=2, seed=3)


@pytest.fixture(scope="module")
def default_model_report():
    """Every strategy under the default (paper-calibrated) model, on fewer steps than the CLI."""
    return sim.simulate(dataclasses.replace(sim.SimConfig(), steps=4))


@pytest.fixture(scope="module")
def small_spends():
    """(strategy name, step, what it spent) for every strategy on SMALL's steps."""
    out = []
    for index in range(SMALL.steps):
        step = sim.draw_step(SMALL, index)
        out += [(name, step, strategy(SMALL, step)) for name, strategy in sim.STRATEGIES.items()]
    return out


# --- calibration -----------------------------------------------------------------------------
def test_default_calibration_shows_the_papers_grpo_symptoms(default_model_report):
    c = default_model_report.calibration
    assert 0.26 <= c.tool_use_rate <= 0.34  # ~30% of rollouts call a tool
    assert 0.34 <= c.all_wrong_rate <= 0.46  # ~40% of tool subgroups are all wrong
    assert 2.5 <= c.clusters_per_prefix <= 3.5  # ~3 semantic clusters of calls per prefix
    assert 0.24 <= c.collapsed_share <= 0.36  # ~30% collapse to one
    assert c.c_entropy_spearman < -0.4  # c_s is low where the prefix's calls are spread
    text = sim.format_calibration(default_model_report)
    assert f"{c.tool_use_rate:.3f}" in text and f"{c.all_wrong_rate:.3f}" in text


def test_confidence_is_the_chosen_clusters_probability_plus_noise():
    policy = sim.SimulatedPolicy(sim.PolicyModel())
    rng = np.random.default_rng(0)
    q = policy.question(rng, "q0")
    collapsed = sim.ToolPrefix(masses=np.ones(1), success=np.zeros(1), viable=False)
    spread = sim.ToolPrefix(masses=np.full(4, 0.25), success=np.zeros(4), viable=False)
    head = np.array([1, 2, sim.TOOL_OPEN])
    args = (head, np.ones(3, np.int8), np.full(3, -0.1))
    c = {
        name: np.mean([confidence(policy._tool_tail(rng, q, f"{name}{i}", prefix, *args, kind=RolloutKind.ORIGINAL,
                                                     source_id="", prefix_len=0)) for i in range(50)])
        for name, prefix in (("collapsed", collapsed), ("spread", spread))
    }
    assert c["spread"] < c["collapsed"] - 0.05


# --- mechanics -------------------------------------------------------------------------------
def test_budget_is_never_exceeded_and_rollout_2x_spends_B_times_N(small_spends):
    budget = sim.extra_budget(SMALL.r, SMALL.questions, SMALL.n)
    for name, step, spend in small_spends:
        if name == sim.DOUBLE_ROW:
            assert len(spend.extra) == spend.budget == SMALL.questions * SMALL.n
        elif name.startswith("GRPO"):
            assert spend.extra == []
        else:
            assert spend.budget == budget and len(spend.extra) <= budget, name
            if spend.plan.jobs:
                assert len(spend.extra) == spend.plan.used == SMALL.k * len(spend.plan.jobs)


def test_continuations_are_token_exact_and_accepted_by_the_core(small_spends):
    for name, step, spend in small_spends:
        if not spend.plan.jobs:
            continue
        by_job = check_continuations(spend.plan, spend.extra)  # raises on a wrong prefix or count
        build_training_rows(spend.groups, spend.plan, spend.extra, spend.config)
        for job in spend.plan.jobs:
            for cont in by_job[job.source_id]:
                assert cont.kind is RolloutKind.CONTINUATION and cont.prefix_len == job.prefix_len
                assert np.array_equal(cont.response_ids[: job.prefix_len], job.prefix_ids)
                if name.startswith("AXPO"):
                    # cut right after <tool_call>: tool-using by construction, the call itself redrawn
                    assert job.prefix_ids[-1] == sim.TOOL_OPEN and cont.used_tool
                    assert cont.first_tool_call.body_start == job.prefix_len
                elif name.startswith("ARPO"):
                    # cut after the observation: the call is part of the kept prefix
                    assert cont.first_tool_call.end <= job.prefix_len and cont.response_mask[job.prefix_len - 1] == 0
                elif name == "no-tool resampling":
                    assert not cont.used_tool and job.prefix_ids[-1] == sim.THINK_END
                else:  # w/o prefix fix: fresh rollouts from the question
                    assert job.prefix_len == 0


def test_axpo_recovers_a_group_only_when_a_continuation_is_correct(small_spends):
    for name, step, spend in small_spends:
        if name != sim.AXPO_ROW:
            continue
        result = sim.StrategyResult(name)
        sim.measure(result, step, spend)
        correct_jobs = {c.question_id for c in spend.extra if c.correct}
        assert result.recovered == len(correct_jobs & step.triggered) == len(correct_jobs)
        assert result.prefixes_recovered == len({c.source_id for c in spend.extra if c.correct})
    hopeless = dataclasses.replace(
        SMALL, steps=1, model=sim.PolicyModel(right_call_success=(1e-3, 1e3), wrong_call_success=0.0))
    report = sim.simulate(hopeless, [sim.AXPO_ROW])
    axpo = report.results[sim.AXPO_ROW]
    assert axpo.extra_used > 0 and axpo.triggered > 0 and axpo.recovered == 0


def test_tool_call_signal_reads_the_advantages_on_call_tokens():
    body = [0.5, 0.9, 0.9]
    right_tool = make_rollout("a0", "a", correct=True, call_body=body)
    wrong_tool = make_rollout("a1", "a", correct=False, call_body=body)
    no_tool_right = make_rollout("b0", "b", correct=True)
    tool_wrong = make_rollout("b1", "b", correct=False, call_body=body)
    all_wrong = [make_rollout(f"c{i}", "c", correct=False, call_body=body) for i in range(2)]
    groups = [QuestionGroup("a", (right_tool, wrong_tool)), QuestionGroup("b", (no_tool_right, tool_wrong)),
              QuestionGroup("c", tuple(all_wrong))]
    rows = build_training_rows(groups, sim.EMPTY_PLAN, [], AXPOConfig(enable=False))
    nonzero, positive = sim.tool_call_signal(rows)
    assert nonzero == {"a", "b"}  # b: the all-wrong tool call is pushed down, never up
    assert positive == {"a"}


def test_same_seed_same_table_other_seed_other_table():
    one_step = dataclasses.replace(SMALL, steps=1)
    first, again = sim.simulate(one_step), sim.simulate(one_step)
    assert sim.format_table(first) == sim.format_table(again)
    assert sim.format_calibration(first) == sim.format_calibration(again)
    other = sim.simulate(dataclasses.replace(one_step, seed=4))
    assert sim.format_table(other) != sim.format_table(first)


# --- the result under the default model ---------------------------------------------------------
def test_default_model_ranks_the_strategies_as_the_paper_argues(default_model_report):
    res = default_model_report.results
    per = {name: r.recovered_per_100 for name, r in res.items()}
    assert default_model_report.axpo_vs_double >= 2.0
    assert per[sim.AXPO_ROW] > per["w/o prefix fix (fresh, targeted)"] > per[sim.DOUBLE_ROW]
    assert per[sim.AXPO_ROW] > per["ARPO: branch after observation"]
    assert per["no-tool resampling"] == 0.0
    # fresh rollouts call a tool at the question's propensity; continuations from a tool prefix always do
    assert res[sim.DOUBLE_ROW].tool_share < 0.4 and res[sim.AXPO_ROW].tool_share == 1.0
    assert res[sim.AXPO_ROW].share_positive > res["GRPO (N, no extra)"].share_positive


def test_cli_prints_the_table_and_writes_a_png(tmp_path, capsys):
    png = tmp_path / "sim.png"
    assert main(["simulate", "--questions", "16", "--steps", "1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Calibration" in out and sim.AXPO_ROW in out and "rollout 2x" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_runs_the_base_point_once():
    points = sim.sweep(dataclasses.replace(SMALL, steps=1), {"r": (0.25, 0.5), "k": (4,)},
                       strategies=[sim.AXPO_ROW, sim.DOUBLE_ROW])
    assert [(n, v) for n, v, _ in points] == [("r", 0.25), ("r", 0.5), ("k", 4)]
    assert points[0][2] is points[2][2]
    assert "AXPO / 2x" in sim.format_sweep(points)


def test_strategies_share_random_streams_by_draw_site():
    """Common random numbers: a prefix picked by both rankings gets the same continuations, and
    rollout (1+r)x's extra rollouts are the first ones of rollout 2x."""
    step = sim.draw_step(SMALL, 0)
    axpo = sim.STRATEGIES[sim.AXPO_ROW](SMALL, step)
    rand = sim.STRATEGIES[sim.RANDOM_ROW](SMALL, step)
    by_source = lambda spend: {s: [c for c in spend.extra if c.source_id == s] for s in {c.source_id for c in spend.extra}}  # noqa: E731
    a, b = by_source(axpo), by_source(rand)
    shared = set(a) & set(b)
    assert shared
    for source in shared:
        assert [(c.response_ids.tobytes(), c.correct) for c in a[source]] == \
               [(c.response_ids.tobytes(), c.correct) for c in b[source]]
    some = sim.STRATEGIES[sim.ONE_PLUS_R_ROW](SMALL, step)
    double = sim.STRATEGIES[sim.DOUBLE_ROW](SMALL, step)
    first = {(x.rollout_id, x.response_ids.tobytes(), x.correct) for x in some.extra}
    assert first <= {(x.rollout_id, x.response_ids.tobytes(), x.correct) for x in double.extra}


def test_cli_rejects_a_budget_below_k(capsys):
    assert main(["simulate", "--questions", "2", "--n", "2", "--k", "4", "--png", ""]) == 2
    assert "below K = 4" in capsys.readouterr().err


def test_greedy_streaming_spends_the_same_budget_first_come_within_a_round():
    """The greedy row plans with ``plan_first_come`` on the step's arrival order (longest rollout
    last): the same number of prefixes as the batch plan, whole rounds the same, and the same draws
    for a prefix both pick."""
    from axpo_rllm.core.streaming import plan_first_come

    for index in range(3):
        step = sim.draw_step(SMALL, index)
        exact = sim.STRATEGIES[sim.AXPO_ROW](SMALL, step)
        greedy = sim.STRATEGIES[sim.GREEDY_ROW](SMALL, step)
        arrival = sim.arrival_order(step)
        ends = {g.question_id: max(len(r.response_ids) for r in g.rollouts) for g in step.groups}
        assert [ends[q] for q in arrival] == sorted(ends.values())
        reference = plan_first_come(step.groups, arrival, SMALL.axpo(streaming="greedy"), step.index)
        assert [j.job_id for j in greedy.plan.jobs] == [j.job_id for j in reference.jobs]
        assert len(greedy.plan.jobs) == len(exact.plan.jobs) and len(greedy.extra) == len(exact.extra)
        last = max((j.round for j in exact.plan.jobs), default=-1)
        assert {j.job_id for j in exact.plan.jobs if j.round < last} == {j.job_id for j in greedy.plan.jobs if j.round < last}
        shared = {j.source_id for j in exact.plan.jobs} & {j.source_id for j in greedy.plan.jobs}
        pick = lambda spend: sorted((c.rollout_id, c.response_ids.tobytes()) for c in spend.extra if c.source_id in shared)  # noqa: E731
        assert pick(exact) == pick(greedy)

"""rllm entry points (needs rllm, which is not on PyPI: skipped where it is absent).

rllm finds our evaluator through the ``rllm.evaluators`` entry point (``rllm eval ... --evaluator
axpo``); rows registered in rllm's dataset registry come back as tasks our rllm workflow runs and
our evaluator grades.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.rllm
pytest.importorskip("rllm")

from axpo_rllm.data.loaders import DataError, load_rows  # noqa: E402
from axpo_rllm.data.rllm_evaluator import AXPOEvaluator  # noqa: E402
from axpo_rllm.data.writers import rllm_row  # noqa: E402


def suite_rows(suite):
    return [r for name, path in suite.items() for r in load_rows(path, source="MathVision" if name == "mathvision" else None)[0]]


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """rllm's DatasetRegistry redirected into tmp_path (its paths are class attributes fixed at import)."""
    from rllm.data import DatasetRegistry

    monkeypatch.setattr(DatasetRegistry, "_REGISTRY_FILE", str(tmp_path / "datasets" / "registry.json"))
    monkeypatch.setattr(DatasetRegistry, "_DATASET_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("RLLM_HOME", str(tmp_path))
    return DatasetRegistry


def test_rllm_loads_the_axpo_evaluator_by_entry_point():
    from rllm.eval.evaluator_loader import list_evaluators, load_evaluator
    from rllm.types import Evaluator

    evaluator = load_evaluator("axpo")
    assert isinstance(evaluator, AXPOEvaluator) and isinstance(evaluator, Evaluator)
    (listed,) = [e for e in list_evaluators() if e["name"] == "axpo"]
    assert listed["source"] == "plugin (axpo-rllm)" and listed["type"] == "axpo_rllm.data.rllm_evaluator:AXPOEvaluator"


def test_the_evaluator_grades_rllm_episodes_with_our_verifiers(suite):
    from rllm.types import Episode, Step, Task, Trajectory

    rows = {(r.source, r.task_id): rllm_row(r) for r in suite_rows(suite)}
    evaluator = AXPOEvaluator()

    def grade(key, episode):
        return evaluator.evaluate(Task(id=key[1], instruction="", metadata=rows[key]), episode)

    out = grade(("MathVision", "0"), Episode(trajectories=[Trajectory(output="<think>four</think>\\boxed{4}")]))
    assert (out.reward, out.is_correct, out.metadata["answer_kind"], out.metadata["extracted"]) == (1.0, True, "choice", "4")
    assert not grade(("MathVision", "0"), Episode(artifacts={"answer": "\\boxed{A}"})).is_correct
    steps = [Step(model_response="\\boxed{Paris}"), Step(model_response="")]  # rllm's gateway-captured steps
    qa = grade(("fvqa", "0"), Episode(trajectories=[Trajectory(steps=steps)]))
    assert qa.is_correct and qa.metadata["benchmark"] == "fvqa" and qa.signals[0].value == 1.0
    # a row from some other rllm dataset: data_source + ground_truth, a benchmark our table knows
    other = evaluator.evaluate(Task(id="x", instruction="q", metadata={"data_source": "hrbench_4k", "ground_truth": "C"}),
                               Episode(artifacts={"answer": "\\boxed{C}"}))
    assert other.is_correct and other.metadata["answer_kind"] == "choice"
    with pytest.raises(DataError, match="no ground truth"):
        evaluator.evaluate(Task(id="y", instruction="q", metadata={"data_source": "vstar"}), Episode())


def test_rows_registered_in_rllm_come_back_as_tasks_our_workflow_runs(suite, registry, tmp_path):
    from axpo_rllm.cli import main
    from axpo_rllm.envs.adapters.rllm import task_from_dict
    from axpo_rllm.envs.verifiers import Grader, GraderStats

    files = [str(suite["fvqa"]), str(suite["vstar"]), str(suite["mathvision"])]
    assert main(["data", "convert", *files, "--source", "MathVision", "--to", "rllm", "--name", "axpo-suite", "--split-name", "test"]) == 0
    assert registry.dataset_exists("axpo-suite", "test")
    data = registry.load_dataset("axpo-suite", "test").get_data()
    assert len(data) == 9
    tasks = {(t.metadata["benchmark"], t.task_id): t for t in map(task_from_dict, data)}
    mc = tasks[("MathVision", "0")]
    assert mc.images[0].size == (48, 40) and mc.data_source == "choice" and mc.metadata["choices"] == ["3", "4", "5", "6"]
    grader = Grader(stats=GraderStats())
    assert grader.grade_task(mc, "\\boxed{B}").correct and grader.grade_task(tasks[("fvqa", "0")], "\\boxed{Paris}").correct
    assert tasks[("vstar", "v1")].images[0].size == (80, 60)

    rllm_tasks = registry.load_dataset("axpo-suite", "test", as_tasks=True).get_data()  # what `rllm eval` hands evaluators
    from rllm.types import Episode

    verdicts = [AXPOEvaluator().evaluate(t, Episode(artifacts={"answer": "\\boxed{A}"})) for t in rllm_tasks]
    assert [v.is_correct for v in verdicts] == [False, False, False, True, False, False, False, False, False]


def test_rows_without_metadata_register_and_come_back_as_tasks(registry, tmp_path):
    """rllm stores a split as parquet, which has no struct with zero fields: a data set whose rows
    carry no extra columns must still register (the end-to-end run's jsonl rows are such rows)."""
    from axpo_rllm.data.writers import register_rllm
    from axpo_rllm.envs.adapters.rllm import task_from_dict

    path = tmp_path / "plain.jsonl"
    path.write_text('{"id": "q1", "question": "Who founded Draportmo?", "answer": "Vatadra", "answer_kind": "em"}\n'
                    '{"id": "q2", "question": "What is 6 times 7?", "answer": "42", "answer_kind": "numeric"}\n')
    rows, _ = load_rows(str(path), source="plain")
    assert all(not r.metadata for r in rows)
    assert register_rllm(rows, "plain", split="train") == 2
    back = [task_from_dict(dict(r)) for r in registry.load_dataset("plain", "train")]
    assert [(t.task_id, t.answer) for t in back] == [("q1", "Vatadra"), ("q2", "42")]

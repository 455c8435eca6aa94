"""An rllm ``Evaluator`` that grades with axpo-rllm's verifiers (entry point ``rllm.evaluators: axpo``).

``rllm eval <benchmark> --agent <flow> --evaluator axpo`` then scores every episode the way our
training and ``axpo-rllm eval`` do: the task row's ``data_source`` (or ``benchmark``) picks the
answer kind through :mod:`axpo_rllm.data.sources` (a row's ``answer_type`` and options count, as
in our loaders), the ground truth is read from the same spellings (``ground_truth``, ``answer``,
``reward_model.ground_truth`` ...), and the final answer must be committed the same way
(``\\boxed{}``, ``<answer>``, an ``Answer:`` line; text after ``</think>``).

The episode's final text follows rllm's own convention (its ``reward_fns`` helpers):
``episode.artifacts["answer"]``, else the last trajectory's ``output``, else its last step's
``output``, else the last non-empty ``model_response``.

A row that names no ground truth or an unknown source raises :class:`~axpo_rllm.data.loaders.DataError`
(nothing to grade is not a zero). A grader timeout or crash is reward 0 with ``grader_failure``
in the output's metadata and counted in :data:`axpo_rllm.envs.verifiers.GRADER_STATS`.

Why no ``rllm.agents`` flow: rllm's ``AgentFlow.run(task, config)`` talks to the model through the
OpenAI-compatible ``config.base_url`` of rllm's gateway, which proxies ``/v1/*`` text routes.
Our agent is token-in/token-out (prompt ids with one unexpanded image pad per image, plus the
images, to vLLM's ``/inference/v1/generate``, docs/upstream.md §1b) and renders prompts with the model's
own tokenizer and chat template; neither the route nor the tokenizer reaches a flow through that
contract, and a chat-level re-implementation would evaluate a different agent than the one we
train. ``axpo-rllm eval`` runs the real agent against the same vLLM server instead.
"""

from __future__ import annotations

from typing import Any, Mapping

from axpo_rllm.envs.verifiers import Grader

from .loaders import RowOrigin, normalize_row
from .sources import VerifierMap

__all__ = ["AXPOEvaluator", "episode_answer_text"]


def episode_answer_text(episode: Any) -> str:
    """The episode's final text, by rllm's convention (module docstring)."""
    artifacts = getattr(episode, "artifacts", None) or {}
    if "answer" in artifacts:
        return str(artifacts["answer"])
    trajectories = getattr(episode, "trajectories", None) or []
    if not trajectories:
        return ""
    traj = trajectories[-1]
    if getattr(traj, "output", None):
        return str(traj.output)
    steps = getattr(traj, "steps", None) or []
    if steps and getattr(steps[-1], "output", None):
        return str(steps[-1].output)
    for step in reversed(steps):
        if getattr(step, "model_response", None):
            return str(step.model_response)
    return ""


class AXPOEvaluator:
    """rllm ``Evaluator`` protocol: ``evaluate(task, episode) -> rllm.eval.types.EvalOutput``."""

    name = "axpo"

    def __init__(self, verifiers: Mapping[str, str] | None = None, grader: Grader | None = None) -> None:
        self.verifiers = VerifierMap(dict(verifiers or {}))
        self.grader = grader if grader is not None else Grader()

    def evaluate(self, task: Any, episode: Any):
        from rllm.eval.types import EvalOutput, Signal  # rllm is optional: only its own runner calls this

        row_data = getattr(task, "metadata", task)
        if not isinstance(row_data, Mapping):
            raise TypeError(f"AXPOEvaluator needs a task whose metadata is the dataset row, got {type(row_data).__name__}")
        task_id = getattr(task, "id", None) or row_data.get("task_id") or row_data.get("id") or "?"
        row = normalize_row(row_data, RowOrigin("rllm task", task_id, "id"), verifiers=self.verifiers, grading_only=True)
        response = episode_answer_text(episode)
        result = self.grader.grade(row.grader_source, response, row.answer, row.grader_metadata)
        return EvalOutput(
            reward=float(result.reward),
            is_correct=bool(result.correct),
            signals=[Signal(name="accuracy", value=float(result.correct))],
            metadata={"extracted": result.extracted, "expected": row.answer, "answer_kind": row.kind, "benchmark": row.source,
                      "grader_failure": result.failure},
        )

"""Pass@1 / Pass@4 and tool-use rate on held-out tasks (AXPO_SPEC §9: the paper's metrics).

Pass@1 is the mean accuracy over the k samples of each question, averaged over questions;
Pass@k uses the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` for ``c``
correct of ``n`` samples. The samples are the agent's own multi-turn episodes (the workflow with
AXPO off, rollout sampling parameters), so evaluation sees exactly what training sees. Every
number is also reported per task family (the synthetic tasks' "benchmarks").
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.records import QuestionGroup, Task
from axpo_rllm.engines.base import RolloutEngine

__all__ = ["pass_at_k", "group_scores", "evaluate"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct out of ``n`` samples (needs ``n >= k``)."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def group_scores(groups: Sequence[QuestionGroup], family: Callable[[str], str], k: int = 4) -> dict[str, float]:
    """Pass@1, Pass@k, tool-use rate and accuracy with/without tools, overall and per family."""
    per: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    tool_correct: dict[str, list[float]] = defaultdict(list)
    no_tool_correct: dict[str, list[float]] = defaultdict(list)
    for g in groups:
        n = len(g.rollouts)
        c = sum(r.correct for r in g.rollouts)
        tool = float(np.mean([r.used_tool for r in g.rollouts]))
        row = (c / n, pass_at_k(n, c, k), tool)
        for key in ("all", family(g.question_id)):
            per[key].append(row)
            tool_correct[key] += [float(r.correct) for r in g.rollouts if r.used_tool]
            no_tool_correct[key] += [float(r.correct) for r in g.rollouts if not r.used_tool]
    out: dict[str, float] = {}
    for key, rows in per.items():
        arr = np.asarray(rows)
        prefix = "eval" if key == "all" else f"eval/{key}"
        out[f"{prefix}/pass@1"] = float(arr[:, 0].mean())
        out[f"{prefix}/pass@{k}"] = float(arr[:, 1].mean())
        out[f"{prefix}/tool_use_rate"] = float(arr[:, 2].mean())
        out[f"{prefix}/acc_tool"] = float(np.mean(tool_correct[key])) if tool_correct[key] else math.nan
        out[f"{prefix}/acc_no_tool"] = float(np.mean(no_tool_correct[key])) if no_tool_correct[key] else math.nan
        out[f"{prefix}/questions"] = float(len(rows))
    return out


def evaluate(
    engine: RolloutEngine,
    chat: ChatFormat,
    env_factory: Callable[[], Any],
    tasks: Sequence[Task],
    *,
    k: int = 4,
    agent_config: AgentConfig | None = None,
    seed: int = 0,
    chunk: int = 16,
) -> dict[str, float]:
    """Sample ``k`` episodes per task with the current policy and score them.

    Runs the AXPO workflow with AXPO off (plain sampling), ``chunk`` questions at a time.
    """
    if not tasks:
        raise ValueError("evaluate needs at least one task")
    config = WorkflowConfig(n=k, axpo=AXPOConfig(enable=False), agent=agent_config or AgentConfig(), seed=seed)
    workflow = AXPOWorkflow(engine, chat, env_factory, config)
    families = {t.task_id: str(t.metadata.get("family", "all")) for t in tasks}
    groups: list[QuestionGroup] = []
    failed = 0.0
    for start in range(0, len(tasks), chunk):
        result = workflow.run_step(list(tasks[start : start + chunk]), step=10_000 + start)
        groups += result.groups
        failed += result.metrics.get("workflow/failed_rollouts", 0.0)
    scores = group_scores(groups, lambda qid: families[qid], k=k)
    scores["eval/failed_rollouts"] = failed
    scores["eval/mean_turns"] = float(np.mean([r.turns for g in groups for r in g.rollouts]))
    return scores



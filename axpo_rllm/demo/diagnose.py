"""The recovery chain of a checkpoint, per tool family, measured by sampling (``axpo-rllm main --diagnose``).

AXPO recovers an all-wrong tool group when a call resampled from one of its prefixes is right
and the answer after it is right. This module samples each link from the policy as it stands:

1. N rollouts per question (the workflow's phase 1, AXPO off, the RL sampling settings): tool
   use, P(right | direct answer), P(right | tool answer), the share of tool subgroups all wrong;
2. from each tool-using rollout's prefix (the question + its tokens up to and including
   ``<tool_call>``, exactly what AXPO resamples), K fresh calls and what follows: P(right call |
   prefix) and P(right answer | right call), P(right answer | wrong call);
3. the recovery a prefix can expect, 1 − (1 − P(right call)·P(right | right call))^K, next to the
   share of prefixes that recovered.

"Right call" is the world's own reading of a call (:meth:`GapWorld.call_is_right`: its
observation shows the asked square or country). For a world without candidate calls it is "the
observation's text holds the answer" (code, search) and "None" where that cannot be read (crop).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import prefix_len
from axpo_rllm.core.records import Candidate, Rollout, Task
from axpo_rllm.core.planner import make_job

__all__ = ["first_call", "observation_text", "call_verdict", "diagnose", "format_diagnosis"]

def first_call(rollout: Rollout, decode: Callable[[Sequence[int]], str]) -> tuple[str, dict] | None:
    """The rollout's first tool call as ``(name, arguments)``, or None (no call, or malformed)."""
    span = rollout.first_tool_call
    if span is None or not span.valid:
        return None
    text = decode(rollout.response_ids[span.body_start : span.end])
    body = text.split("</tool_call>")[0].strip()
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("arguments", {}), dict):
        return None
    return str(payload.get("name", "")), payload.get("arguments", {})


def observation_text(rollout: Rollout, decode: Callable[[Sequence[int]], str]) -> str:
    """The text of the first observation (the masked tokens right after the first call)."""
    span = rollout.first_tool_call
    if span is None:
        return ""
    ids, mask = rollout.response_ids, rollout.response_mask
    start = span.end
    while start < len(ids) and mask[start] != 0:
        start += 1
    end = start
    while end < len(ids) and mask[end] == 0:
        end += 1
    return decode(ids[start:end])


def call_verdict(world: Any, task: Task, rollout: Rollout, decode) -> bool | None:
    """Whether the rollout's first call is right (None: no readable call, or no way to tell)."""
    call = first_call(rollout, decode)
    if hasattr(world, "call_is_right") and "calls" in task.metadata:
        return False if call is None else bool(world.call_is_right(task, *call))
    if str(task.metadata.get("family")) in ("code", "search"):
        return task.answer in observation_text(rollout, decode)
    return None


def _rate(hits: int, n: int) -> float:
    return hits / n if n else math.nan


def diagnose(
    engine, chat, env_factory, world, tasks: Sequence[Task], agent_config, *, n: int = 8, k: int = 4,
    max_prefixes: int = 2, seed: int = 0, log: Callable[[str], None] = lambda s: None,
) -> dict[str, dict[str, float]]:
    """Sample the recovery chain of the current policy on ``tasks``, per family (see the module)."""
    decode = lambda ids: chat.tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    wf = AXPOWorkflow(engine, chat, env_factory, WorkflowConfig(n=n, axpo=AXPOConfig(enable=False), agent=agent_config, seed=seed))
    by_id = {t.task_id: t for t in tasks}
    counts: dict[str, Counter] = defaultdict(Counter)
    jobs, sources = [], {}
    chunk = 8
    for start in range(0, len(tasks), chunk):
        batch = list(tasks[start : start + chunk])
        groups = wf.run_step(batch, step=0).groups
        for group in groups:
            task = by_id[group.question_id]
            c = counts[str(task.metadata["family"])]
            c["questions"] += 1
            tool = [r for r in group.rollouts if r.used_tool]
            c["rollouts"] += len(group.rollouts)
            c["tool"] += len(tool)
            c["direct_right"] += sum(r.correct for r in group.rollouts if not r.used_tool)
            c["tool_right"] += sum(r.correct for r in tool)
            if tool:
                c["with_tool"] += 1
                c["all_wrong"] += not any(r.correct for r in tool)
            for r in tool:
                verdict = call_verdict(world, task, r, decode)
                if verdict is not None:
                    c["calls_judged"] += 1
                    c["calls_right"] += verdict
                    c["answer_after_right"] += verdict and r.correct
                    c["answer_after_wrong"] += (not verdict) and r.correct
            for r in [r for r in tool if prefix_len(r) is not None][:max_prefixes]:
                cand = Candidate(group.question_id, r.rollout_id, prefix_len(r), 0.0, 0.0)
                jobs.append(make_job(r, cand, 0, AXPOConfig(k=k)))
                sources[r.rollout_id] = not any(x.correct for x in tool)
        log(f"diagnose: phase 1 {min(start + chunk, len(tasks))}/{len(tasks)} questions")
    continuations = asyncio.run(wf.continuations(jobs, by_id, 1, asyncio.Semaphore(64), Counter())) if jobs else []
    per_job: dict[str, list[Rollout]] = defaultdict(list)
    for e in continuations:
        per_job[e.rollout.source_id].append(e.rollout)
    for source_id, conts in per_job.items():
        task = by_id[conts[0].question_id]
        c = counts[str(task.metadata["family"])]
        c["prefixes"] += 1
        c["prefix_recovered"] += any(r.correct and r.used_tool for r in conts)
        if sources[source_id]:
            c["prefixes_all_wrong"] += 1
            c["prefix_recovered_all_wrong"] += any(r.correct and r.used_tool for r in conts)
        for r in conts:
            c["resampled"] += 1
            verdict = call_verdict(world, task, r, decode)
            if verdict is None:
                continue
            c["resampled_judged"] += 1
            c["resampled_right"] += verdict
            c["resampled_answer_after_right"] += verdict and r.correct
            c["resampled_answer_after_wrong"] += (not verdict) and r.correct
    return {family: _figures(c, k) for family, c in sorted(counts.items())}


def _figures(c: Counter, k: int) -> dict[str, float]:
    p_call = _rate(c["resampled_right"], c["resampled_judged"])
    p_read = _rate(c["resampled_answer_after_right"], c["resampled_right"])
    expected = 1 - (1 - p_call * p_read) ** k if not (math.isnan(p_call) or math.isnan(p_read)) else math.nan
    return {
        "questions": c["questions"],
        "tool_use": _rate(c["tool"], c["rollouts"]),
        "p_right_direct": _rate(c["direct_right"], c["rollouts"] - c["tool"]),
        "p_right_tool": _rate(c["tool_right"], c["tool"]),
        "all_wrong": _rate(c["all_wrong"], c["with_tool"]),
        "p_right_call_original": _rate(c["calls_right"], c["calls_judged"]),
        "p_right_call_prefix": p_call,
        "p_answer_right_call": p_read,
        "p_answer_wrong_call": _rate(c["resampled_answer_after_wrong"], c["resampled_judged"] - c["resampled_right"]),
        "prefixes": c["prefixes"],
        "recovery_expected": expected,
        "recovery_measured": _rate(c["prefix_recovered"], c["prefixes"]),
        "recovery_all_wrong": _rate(c["prefix_recovered_all_wrong"], c["prefixes_all_wrong"]),
    }


COLUMNS = (
    ("tool_use", "tool use"), ("p_right_direct", "P(r|direct)"), ("p_right_tool", "P(r|tool)"),
    ("all_wrong", "all-wrong"), ("p_right_call_prefix", "P(call|prefix)"), ("p_answer_right_call", "P(r|right call)"),
    ("p_answer_wrong_call", "P(r|wrong call)"), ("recovery_expected", "recov. expected"),
    ("recovery_measured", "recov. measured"),
)


def format_diagnosis(figures: dict[str, dict[str, float]], k: int) -> str:
    """A markdown table, one row per family."""
    head = "| family | questions | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for family, f in figures.items():
        cells = ["—" if isinstance(f[key], float) and math.isnan(f[key]) else f"{f[key]:.2f}" for key, _ in COLUMNS]
        lines.append(f"| {family} | {f['questions']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"P(call|prefix): share of right calls among K={k} calls resampled from each tool-using "
                 f"prefix; recov. expected = 1 − (1 − P(call|prefix)·P(r|right call))^{k}; "
                 "recov. measured: prefixes with a right answer among their K.")
    return "\n".join(lines)

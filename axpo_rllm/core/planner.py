"""AXPO §1–§5, top to bottom: which prefixes of a step get K continuations.

Read beside ``docs/algorithm.md``; the sections are the spec's, in the order they happen in a step:

    §1 trigger        which questions have an all-wrong tool-using subgroup
    §2 prefix         where each source rollout is cut (token-exact, at the tool-call boundary)
    §3 confidence     c_s, the mean probability of the source's tool-call tokens (uncertainty ranking)
    §4 budget         E = floor(r·B·N) extra samples, spent breadth-first, K per prefix or none
    §5 resampling     (done by the workflow, ``axpo_rllm.agents.workflow``; checked here)

§6 (advantages) is :mod:`axpo_rllm.core.advantages`; the order of the phases is
:mod:`axpo_rllm.core.step`. Framework-neutral: records in, records out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

from axpo_rllm.core.config import AXPOConfig, Ranking, Target
from axpo_rllm.core.records import (
    Candidate,
    QuestionGroup,
    RecordError,
    ResampleJob,
    ResamplePlan,
    Rollout,
    RolloutKind,
    Termination,
    rollouts_by_id,
)

__all__ = [
    "is_triggered",
    "prefix_len",
    "confidence",
    "mean_probability",
    "extra_budget",
    "collect_candidates",
    "eligible_sources",
    "step_budget",
    "allocate_breadth_first",
    "plan_resampling",
    "check_groups",
    "check_continuations",
]


# ---------------------------------------------------------------------------------------------
# §1 Trigger: AXPO acts on q only when its tool-using subgroup is non-empty and all wrong.
# ---------------------------------------------------------------------------------------------
def target_subgroup(group: QuestionGroup, target: Target) -> tuple[Rollout, ...]:
    return group.tool_subgroup if target == "tool" else group.no_tool_subgroup


def is_triggered(group: QuestionGroup, target: Target = "tool") -> bool:
    """T_q non-empty and every rollout in T_q has r = 0."""
    subgroup = target_subgroup(group, target)
    return bool(subgroup) and not any(r.correct for r in subgroup)


# ---------------------------------------------------------------------------------------------
# §2 Prefix: the question + the source's tokens up to and including the token(s) that open its
# first tool call. Continuations are tool-using by construction; the call's content and all
# that follows are resampled. (no_tool ablation: the reasoning up to where it answers.)
# ---------------------------------------------------------------------------------------------
def prefix_len(rollout: Rollout, target: Target = "tool") -> int | None:
    """The prefix's length in ``response_ids`` (its cut index: ``response_ids[:prefix_len]`` is the
    prefix), or None when the rollout has no such point. For a tool rollout it is the first call's
    ``body_start``: the opener ``<tool_call>`` belongs to the prefix."""
    if target == "tool":
        call = rollout.first_tool_call
        return None if call is None else call.body_start
    return rollout.answer_start if rollout.answer_start > 0 else None


def is_eligible_source(rollout: Rollout, target: Target) -> bool:
    """A source needs a cut point; an errored episode's tokens are incomplete, so it is never a source."""
    return rollout.termination is not Termination.ERROR and prefix_len(rollout, target) is not None


# ---------------------------------------------------------------------------------------------
# §3 Uncertainty ranking: c_s = mean over the source's tool-call tokens of exp(logprob), a
# confidence (higher = more certain); the least confident prefixes are resampled first.
# ---------------------------------------------------------------------------------------------
def scored_tokens(rollout: Rollout, target: Target) -> slice:
    """The tokens whose probabilities make c_s: the first call's content (tool) or the answer (no_tool)."""
    if target == "tool":
        call = rollout.first_tool_call
        return slice(call.body_start, call.end)
    return slice(rollout.answer_start, len(rollout.response_ids))


def confidence(rollout: Rollout, target: Target = "tool") -> float:
    """c_s in [0, 1], the source's confidence in its call: higher = more certain; the
    ``uncertainty`` ranking resamples the lowest first. Observation tokens never count."""
    window = scored_tokens(rollout, target)
    logprobs = rollout.response_logprobs[window]
    if target == "no_tool":  # a tool call span is all model tokens (Rollout checks it); an answer may not be
        logprobs = logprobs[rollout.response_mask[window].astype(bool)]
    if not len(logprobs):
        raise RecordError(f"rollout {rollout.rollout_id}: no model tokens in {window} to score its confidence c_s")
    return mean_probability(logprobs)


def mean_probability(logprobs: Sequence[float]) -> float:
    """mean exp(logprob) of the scored tokens, taken as float32 as a ``Rollout`` stores them (the
    agent scores a call with this while the rollout still runs: same tokens, same value)."""
    # A call is tens of tokens: plain floats beat numpy's per-call overhead here.
    values = np.asarray(logprobs, dtype=np.float32).tolist()
    return math.fsum(map(math.exp, values)) / len(values)


# ---------------------------------------------------------------------------------------------
# §4 Budget: E = floor(r·B·N); breadth-first over triggered questions; K per prefix or none.
# ---------------------------------------------------------------------------------------------
def extra_budget(r: float, num_questions: int, group_size: int) -> int:
    """E = floor(r·B·N) (a tiny tolerance keeps 0.1·B·N from flooring one below)."""
    return int(math.floor(r * num_questions * group_size + 1e-9))


def collect_candidates(
    groups: Sequence[QuestionGroup], config: AXPOConfig, rng: np.random.Generator
) -> tuple[tuple[str, ...], dict[str, list[Candidate]]]:
    """Triggered question ids (input order) and each one's candidate prefixes, best first.

    The ``random`` ranking draws one key per candidate, in question input order: a candidate's
    draw depends on how many candidates the questions before it have
    (:mod:`axpo_rllm.core.streaming` relies on exactly this order)."""
    triggered: list[str] = []
    by_question: dict[str, list[Candidate]] = {}
    for group in groups:
        if not is_triggered(group, config.resample_target):
            continue
        triggered.append(group.question_id)
        found = [
            Candidate(
                question_id=group.question_id,
                source_id=source.rollout_id,
                prefix_len=prefix_len(source, config.resample_target),
                confidence=c,
                rank_key=rank_key(c, config.ranking, rng),
            )
            for source, c in eligible_sources(group, config.resample_target)
        ]
        if found:
            by_question[group.question_id] = sorted(found, key=lambda cand: cand.rank_key)
    return tuple(triggered), by_question


def eligible_sources(group: QuestionGroup, target: Target) -> list[tuple[Rollout, float]]:
    """The rollouts of q's target subgroup that can be sources, in group order, with their c_s."""
    return [(s, confidence(s, target)) for s in target_subgroup(group, target) if is_eligible_source(s, target)]


def rank_key(c: float, ranking: Ranking, rng: np.random.Generator) -> float:
    if ranking == "uncertainty":
        return c
    if ranking == "confidence":
        return -c
    return float(rng.random())


def allocate_breadth_first(
    candidates: Mapping[str, Sequence[Candidate]], budget: int, k: int
) -> list[tuple[Candidate, int]]:
    """Round j takes the j-th ranked prefix of every triggered question, questions ordered by that
    prefix's rank key; each costs K. Stops when fewer than K samples are left or no candidate is.

    Returns ``(candidate, round)`` in selection order. Ties keep input order (stable sort).
    """
    selected: list[tuple[Candidate, int]] = []
    remaining = budget
    depth = max((len(c) for c in candidates.values()), default=0)
    for round_ in range(depth):
        this_round = sorted(
            (cands[round_] for cands in candidates.values() if round_ < len(cands)),
            key=lambda cand: cand.rank_key,
        )
        for cand in this_round:
            if remaining < k:
                return selected
            selected.append((cand, round_))
            remaining -= k
    return selected


def plan_resampling(groups: Sequence[QuestionGroup], config: AXPOConfig, step: int = 0) -> ResamplePlan:
    """§1–§4 for one step: which prefixes get K continuations under the r·B·N budget."""
    group_size = check_groups(groups)
    if not config.enable:
        return ResamplePlan(budget=0, jobs=(), triggered=(), candidates=())
    budget = step_budget(config, len(groups), group_size)
    rng = np.random.default_rng([config.seed, step])
    triggered, candidates = collect_candidates(groups, config, rng)
    by_id = rollouts_by_id([r for g in groups for r in g.rollouts])
    jobs = tuple(
        make_job(by_id[cand.source_id], cand, round_, config) for cand, round_ in allocate_breadth_first(candidates, budget, config.k)
    )
    all_candidates = tuple(c for q in triggered for c in candidates.get(q, ()))
    return ResamplePlan(budget=budget, jobs=jobs, triggered=triggered, candidates=all_candidates)


def step_budget(config: AXPOConfig, num_questions: int, group_size: int) -> int:
    """E for a step of B questions x N rollouts; E < K is a config error (nothing could ever be resampled)."""
    budget = extra_budget(config.r, num_questions, group_size)
    if budget < config.k:
        raise ValueError(
            f"AXPO budget E = floor(r·B·N) = floor({config.r}·{num_questions}·{group_size}) = {budget} "
            f"is below K = {config.k}: no prefix could ever be resampled. Raise r or the batch size, "
            "or lower K."
        )
    return budget


def check_groups(groups: Sequence[QuestionGroup]) -> int:
    """Every question must carry its N rollouts (failed ones recorded, not dropped): return N."""
    if not groups:
        raise ValueError("plan_resampling needs at least one question group")
    sizes = {len(g.rollouts) for g in groups}
    if len(sizes) != 1:
        raise ValueError(
            f"question groups have different sizes {sorted(sizes)}; every question must keep its N "
            "rollouts (record failed ones with Termination.ERROR instead of dropping them)"
        )
    ids = [g.question_id for g in groups]
    if len(set(ids)) != len(ids):
        raise ValueError("question ids repeat across groups")
    return sizes.pop()


def make_job(source: Rollout, cand: Candidate, round_: int, config: AXPOConfig) -> ResampleJob:
    """The request for one selected prefix: prompt + prefix ids, exactly, with their images."""
    prefix_len = cand.prefix_len if config.prefix_fix else 0
    turns_used = 1 + (source.first_tool_call.turn if config.resample_target == "tool" else 0)
    return ResampleJob(
        job_id=f"{cand.question_id}/{source.rollout_id}",
        question_id=cand.question_id,
        source_id=source.rollout_id,
        prompt_ids=source.prompt_ids,
        prefix_ids=source.response_ids[:prefix_len],
        prefix_mask=source.response_mask[:prefix_len],
        prefix_logprobs=source.response_logprobs[:prefix_len],
        images=source.images_before(prefix_len),
        k=config.k,
        confidence=cand.confidence,
        round=round_,
        turns_used=turns_used if prefix_len else 0,
    )


# ---------------------------------------------------------------------------------------------
# §5 Resampling is the workflow's job; this checks what comes back is what was planned:
# exactly K continuations per job, each starting with the job's prefix, token for token.
# ---------------------------------------------------------------------------------------------
def check_continuations(plan: ResamplePlan, continuations: Sequence[Rollout]) -> dict[str, list[Rollout]]:
    """Group continuations by job (keyed by source id) and verify count and token-exact prefixes."""
    jobs = {job.source_id: job for job in plan.jobs}
    by_job: dict[str, list[Rollout]] = defaultdict(list)
    for cont in continuations:
        if cont.kind is not RolloutKind.CONTINUATION:
            raise RecordError(f"{cont.rollout_id} is not a continuation")
        job = jobs.get(cont.source_id)
        if job is None:
            raise RecordError(f"continuation {cont.rollout_id} names source {cont.source_id!r}, which the plan did not select")
        if cont.question_id != job.question_id:
            raise RecordError(f"continuation {cont.rollout_id} belongs to {job.question_id}, not {cont.question_id}")
        if cont.prefix_len != job.prefix_len or cont.response_ids[: job.prefix_len].tobytes() != job.prefix_ids.tobytes():
            raise RecordError(
                f"continuation {cont.rollout_id} does not start with its job's prefix of {job.prefix_len} tokens "
                "(continuations must be token-exact)"
            )
        if cont.prompt_ids is not job.prompt_ids and cont.prompt_ids.tobytes() != job.prompt_ids.tobytes():
            raise RecordError(f"continuation {cont.rollout_id} has a different prompt than its source")
        by_job[job.source_id].append(cont)
    for source_id, job in jobs.items():
        got = len(by_job.get(source_id, ()))
        if got != job.k:
            raise RecordError(
                f"job {job.job_id} planned K = {job.k} continuations but {got} came back "
                "(failed continuations must be recorded with Termination.ERROR, not dropped)"
            )
    return dict(by_job)

"""AXPO — Agent eXplorative Policy Optimization — top to bottom.

Read this file beside ``AXPO_SPEC.md``; its sections are the spec's sections, in the order they
happen in a training step:

    §1 trigger        which questions have an all-wrong tool-using subgroup
    §2 prefix         where each source rollout is cut (token-exact, at the tool-call boundary)
    §3 uncertainty    c_s, the mean probability of the source's tool-call tokens
    §4 budget         E = floor(r·B·N) extra samples, spent breadth-first, K per prefix or none
    §5 resampling     (done by the workflow: ``axpo_rllm.agents.workflow``; checked here)
    §6 advantages     continuation groups, the recovery reward, masks -> per-token advantages

Everything is framework-neutral (records in, records and tensors out); the verl and rllm
adapters sit at the edge and call into this module, never the other way round.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from axpo_rllm.records import (
    Candidate,
    LossSegment,
    QuestionGroup,
    RecordError,
    ResampleJob,
    ResamplePlan,
    Rollout,
    RolloutKind,
    RowRole,
    Termination,
    TrainingRow,
    rollouts_by_id,
)

__all__ = [
    "AXPOConfig",
    "is_triggered",
    "prefix_cut",
    "uncertainty",
    "collect_candidates",
    "allocate_breadth_first",
    "plan_resampling",
    "check_continuations",
    "group_normalize",
    "build_training_rows",
    "token_arrays",
    "axpo_step",
    "original_groups",
]

Ranking = Literal["uncertainty", "random", "confidence"]
Target = Literal["tool", "no_tool"]
SourceTail = Literal["mask", "keep"]


# ---------------------------------------------------------------------------------------------
# Hyper-parameters (one dataclass, the paper's defaults). Every ablation of AXPO_SPEC §8 is one
# field here; GRPO is ``enable=False``.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AXPOConfig:
    enable: bool = True
    """False: plain GRPO (no planning, no resampling)."""
    r: float = 0.25
    """Extra-sample ratio: E = floor(r·B·N)."""
    k: int = 4
    """Continuations per selected prefix (all K or none)."""
    ranking: Ranking = "uncertainty"
    """``uncertainty`` (least confident first), ``random`` (ablation), ``confidence`` (most confident first)."""
    prefix_fix: bool = True
    """False = 'w/o prefix fix': the budget buys fresh rollouts from the question (empty prefix)."""
    resample_target: Target = "tool"
    """``no_tool`` = the 'no-tool resampling' ablation: prefixes of non-tool rollouts, cut where they answer."""
    prefix_credit: bool = True
    """False = 'w/o prefix credit': the source keeps its own reward and full-trajectory advantage."""
    separate_groups: bool = True
    """False = 'w/o separate advantage group': continuations are normalised inside q's group."""
    source_tail: SourceTail = "mask"
    """What happens to a credited source's own tokens after the prefix: masked, or kept with
    the advantage they had before the reward replacement."""
    norm_by_std: bool = True
    """Divide by the group std (GRPO) or only centre (Dr.GRPO); verl's ``norm_adv_by_std_in_grpo``."""
    std_unbiased: bool = True
    """Bessel-corrected std, as verl's GRPO (``torch.std``)."""
    epsilon: float = 1e-6
    seed: int = 0
    """Seeds the ``random`` ranking (combined with the step number)."""

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.r <= 16.0, f"r must be in [0, 16], got {self.r!r}"),
            (isinstance(self.k, int) and self.k >= 1, f"k must be an int >= 1, got {self.k!r}"),
            (self.ranking in ("uncertainty", "random", "confidence"),
             f"ranking must be uncertainty|random|confidence, got {self.ranking!r}"),
            (self.resample_target in ("tool", "no_tool"), f"resample_target must be tool|no_tool, got {self.resample_target!r}"),
            (self.source_tail in ("mask", "keep"), f"source_tail must be mask|keep, got {self.source_tail!r}"),
            (self.epsilon >= 0.0, f"epsilon must be >= 0, got {self.epsilon!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AXPOConfig: {message}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "AXPOConfig":
        """Build from a dict / omegaconf node (e.g. verl's ``algorithm.axpo``); unknown keys are an error."""
        if cfg is None:
            return cls()
        data = dict(cfg.items())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AXPOConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


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
def prefix_cut(rollout: Rollout, target: Target = "tool") -> int | None:
    """Index in ``response_ids`` where the prefix ends, or None when the rollout has no such point."""
    if target == "tool":
        call = rollout.first_tool_call
        return None if call is None else call.body_start
    return rollout.answer_start if rollout.answer_start > 0 else None


def is_eligible_source(rollout: Rollout, target: Target) -> bool:
    """A source needs a cut point; an errored episode's tokens are incomplete, so it is never a source."""
    return rollout.termination is not Termination.ERROR and prefix_cut(rollout, target) is not None


# ---------------------------------------------------------------------------------------------
# §3 Uncertainty: c_s = mean over the source's tool-call tokens of exp(logprob).
# ---------------------------------------------------------------------------------------------
def scored_tokens(rollout: Rollout, target: Target) -> slice:
    """The tokens whose probabilities make c_s: the first call's content (tool) or the answer (no_tool)."""
    if target == "tool":
        call = rollout.first_tool_call
        return slice(call.body_start, call.end)
    return slice(rollout.answer_start, len(rollout.response_ids))


def uncertainty(rollout: Rollout, target: Target = "tool") -> float:
    """c_s in [0, 1]; lower = more uncertain = resampled first. Observation tokens never count."""
    window = scored_tokens(rollout, target)
    logprobs = rollout.response_logprobs[window]
    if target == "no_tool":  # a tool call span is all model tokens (Rollout checks it); an answer may not be
        logprobs = logprobs[rollout.response_mask[window].astype(bool)]
    if not len(logprobs):
        raise RecordError(f"rollout {rollout.rollout_id}: no model tokens in {window} to score its uncertainty")
    # A call is tens of tokens: plain floats beat numpy's per-call overhead here.
    return math.fsum(map(math.exp, logprobs.tolist())) / len(logprobs)


# ---------------------------------------------------------------------------------------------
# §4 Budget: E = floor(r·B·N); breadth-first over triggered questions; K per prefix or none.
# ---------------------------------------------------------------------------------------------
def extra_budget(r: float, num_questions: int, group_size: int) -> int:
    """E = floor(r·B·N) (a tiny tolerance keeps 0.1·B·N from flooring one below)."""
    return int(math.floor(r * num_questions * group_size + 1e-9))


def collect_candidates(
    groups: Sequence[QuestionGroup], config: AXPOConfig, rng: np.random.Generator
) -> tuple[tuple[str, ...], dict[str, list[Candidate]]]:
    """Triggered question ids (input order) and each one's candidate prefixes, best first."""
    triggered: list[str] = []
    by_question: dict[str, list[Candidate]] = {}
    for group in groups:
        if not is_triggered(group, config.resample_target):
            continue
        triggered.append(group.question_id)
        found = []
        for source in target_subgroup(group, config.resample_target):
            if not is_eligible_source(source, config.resample_target):
                continue
            c = uncertainty(source, config.resample_target)
            found.append(
                Candidate(
                    question_id=group.question_id,
                    source_id=source.rollout_id,
                    cut=prefix_cut(source, config.resample_target),
                    uncertainty=c,
                    rank_key=rank_key(c, config.ranking, rng),
                )
            )
        if found:
            by_question[group.question_id] = sorted(found, key=lambda cand: cand.rank_key)
    return tuple(triggered), by_question


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
    budget = extra_budget(config.r, len(groups), group_size)
    if budget < config.k:
        raise ValueError(
            f"AXPO budget E = floor(r·B·N) = floor({config.r}·{len(groups)}·{group_size}) = {budget} "
            f"is below K = {config.k}: no prefix could ever be resampled. Raise r or the batch size, "
            "or lower K."
        )
    rng = np.random.default_rng([config.seed, step])
    triggered, candidates = collect_candidates(groups, config, rng)
    by_id = rollouts_by_id([r for g in groups for r in g.rollouts])
    jobs = tuple(
        make_job(by_id[cand.source_id], cand, round_, config) for cand, round_ in allocate_breadth_first(candidates, budget, config.k)
    )
    all_candidates = tuple(c for q in triggered for c in candidates.get(q, ()))
    return ResamplePlan(budget=budget, jobs=jobs, triggered=triggered, candidates=all_candidates)


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
    cut = cand.cut if config.prefix_fix else 0
    turns_used = 1 + (source.first_tool_call.turn if config.resample_target == "tool" else 0)
    return ResampleJob(
        job_id=f"{cand.question_id}/{source.rollout_id}",
        question_id=cand.question_id,
        source_id=source.rollout_id,
        prompt_ids=source.prompt_ids,
        prefix_ids=source.response_ids[:cut],
        prefix_mask=source.response_mask[:cut],
        prefix_logprobs=source.response_logprobs[:cut],
        images=source.images_before(cut),
        k=config.k,
        uncertainty=cand.uncertainty,
        round=round_,
        turns_used=turns_used if cut else 0,
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
        if cont.prefix_length != job.cut or cont.response_ids[: job.cut].tobytes() != job.prefix_ids.tobytes():
            raise RecordError(
                f"continuation {cont.rollout_id} does not start with its job's prefix of {job.cut} tokens "
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


# ---------------------------------------------------------------------------------------------
# §6 Advantages.
#   continuation group (per prefix):  A^res_k = (r_k − mean_k r) / (std_k r + ε), continuation tokens only
#   prefix credit:                     r_prefix = 1 if any continuation is correct else 0
#   q's group:                          source reward := r_prefix; mean′, std′ recomputed;
#                                       A^prefix = (r_prefix − mean′) / (std′ + ε) on the prefix tokens only
#   everything else:                    plain GRPO
# ---------------------------------------------------------------------------------------------
def group_normalize(
    scores: torch.Tensor,
    group_index: torch.Tensor,
    *,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO's group normalisation, vectorised: (score − mean_g) / (std_g + ε) per row.

    Args:
        scores: ``(bs,)`` float, one scalar reward per row.
        group_index: ``(bs,)`` int64 in ``[0, G)``, the row's group (``torch.unique(return_inverse=True)``).

    A group of one row gets mean 0 and std 1, exactly as verl's ``compute_grpo_outcome_advantage``
    (Shao et al. 2024, DeepSeekMath, eq. for outcome supervision).
    """
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    counts = torch.bincount(group_index, minlength=num_groups).to(scores.dtype)
    sums = torch.zeros(num_groups, dtype=scores.dtype).index_add_(0, group_index, scores)
    mean = sums / counts
    centred = scores - mean[group_index]
    sq = torch.zeros(num_groups, dtype=scores.dtype).index_add_(0, group_index, centred * centred)
    dof = (counts - 1.0) if unbiased else counts
    std = torch.sqrt(sq / dof.clamp(min=1.0))
    singleton = counts == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    centred = scores - mean[group_index]
    if not norm_by_std:
        return centred
    return centred / (std[group_index] + epsilon)


def group_ids_to_index(group_ids: Iterable[Any]) -> torch.Tensor:
    """Dense group numbers ``[0, G)`` in first-seen order (any hashable ids, e.g. verl's uid objects)."""
    numbering: dict[Any, int] = {}
    return torch.tensor([numbering.setdefault(g, len(numbering)) for g in group_ids], dtype=torch.long)


def build_training_rows(
    groups: Sequence[QuestionGroup],
    plan: ResamplePlan,
    continuations: Sequence[Rollout],
    config: AXPOConfig,
) -> list[TrainingRow]:
    """§6: the step's rows (originals in input order, then each job's continuations) with their
    advantage groups, scores and loss segments.

    Built column by column (one list per field) because a step has thousands of rows.
    """
    by_job = check_continuations(plan, continuations) if plan.jobs else {}
    jobs = {job.source_id: job for job in plan.jobs}
    recovery = {sid: float(any(c.correct for c in conts)) for sid, conts in by_job.items()}
    credit = config.prefix_credit
    keep_tail = config.source_tail == "keep"

    rollouts: list[Rollout] = []
    roles: list[RowRole] = []
    adv_groups: list[str] = []
    scores: list[float] = []
    windows: list[tuple[int, int] | None] = []  # the one window that learns, None: fully masked
    tails: list[int] = []  # source_tail=keep: tokens [tail, n) keep the pre-replacement advantage
    for group in groups:
        for rollout in group.rollouts:
            job = jobs.get(rollout.rollout_id)
            rollouts.append(rollout)
            adv_groups.append(rollout.question_id)
            if job is None or not credit or job.cut == 0:
                roles.append(RowRole.ORDINARY)
                scores.append(float(rollout.reward))
                windows.append((0, len(rollout.response_ids)) if reaches_loss(rollout) else None)
                tails.append(-1)
            else:
                roles.append(RowRole.SOURCE_PREFIX)
                scores.append(recovery[rollout.rollout_id])  # r_prefix replaces the source's reward
                windows.append((0, job.cut))
                tails.append(job.cut if keep_tail else -1)
    for job in plan.jobs:
        group_id = f"{job.question_id}::{job.source_id}" if config.separate_groups else job.question_id
        for cont in by_job[job.source_id]:
            rollouts.append(cont)
            roles.append(RowRole.CONTINUATION)
            adv_groups.append(group_id)
            scores.append(float(cont.reward))
            # the prefix is context, not action
            windows.append((job.cut, len(cont.response_ids)) if reaches_loss(cont) else None)
            tails.append(-1)

    norm = dict(epsilon=config.epsilon, norm_by_std=config.norm_by_std, unbiased=config.std_unbiased)
    advantages = group_normalize(torch.tensor(scores, dtype=torch.float32), group_ids_to_index(adv_groups), **norm).tolist()
    tail_adv = pre_replacement_advantages(groups, norm) if keep_tail and plan.jobs else {}
    rows = []
    for rollout, role, adv_group, score, window, tail, adv in zip(rollouts, roles, adv_groups, scores, windows, tails, advantages):
        segments = (LossSegment(window[0], window[1], adv),) if window else ()
        if tail >= 0:
            segments += (LossSegment(tail, len(rollout.response_ids), tail_adv[rollout.rollout_id]),)
        rows.append(TrainingRow(rollout, role, adv_group, score, segments))
    return rows


def reaches_loss(rollout: Rollout) -> bool:
    """Over-turn (Mini-o3 masking) and errored rollouts count in their group's statistics with
    their reward, but their tokens never reach the loss: an over-turn episode is not a behaviour to
    push either way, and an errored one was cut short by the engine or env, not by the policy."""
    return rollout.termination not in (Termination.OVER_TURN, Termination.ERROR)


def pre_replacement_advantages(groups: Sequence[QuestionGroup], norm: Mapping[str, Any]) -> dict[str, float]:
    """Plain GRPO advantages of the originals (what a source's tail keeps under source_tail=keep)."""
    originals = [r for g in groups for r in g.rollouts]
    scores = torch.tensor([float(r.reward) for r in originals], dtype=torch.float32)
    adv = group_normalize(scores, group_ids_to_index([r.question_id for r in originals]), **norm)
    return {r.rollout_id: a for r, a in zip(originals, adv.tolist())}


def token_arrays(rows: Sequence[TrainingRow], response_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows into ``(advantages, loss_mask)``, each ``(bs, R)``: float32 and int8.

    ``loss_mask`` = the model-token mask restricted to the row's segments; ``advantages`` is each
    segment's advantage on its tokens and 0 elsewhere (already multiplied by the mask).
    """
    lengths = [len(row.rollout.response_ids) for row in rows]
    width = max(lengths, default=0) if response_length is None else response_length
    if lengths and max(lengths) > width:
        raise ValueError(f"a row has {max(lengths)} response tokens, more than response_length={width}")
    loss_mask = np.zeros((len(rows), width), dtype=np.int8)
    values = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        model = row.rollout.response_mask
        for seg in row.segments:
            loss_mask[i, seg.start : seg.end] = model[seg.start : seg.end]
            values[i, seg.start : seg.end] = seg.advantage
    values *= loss_mask
    return torch.from_numpy(values), torch.from_numpy(loss_mask)


def axpo_step(
    groups: Sequence[QuestionGroup],
    resample: Callable[[ResamplePlan], Sequence[Rollout]],
    config: AXPOConfig,
    step: int = 0,
) -> tuple[ResamplePlan, list[Rollout], list[TrainingRow]]:
    """One step's algorithm in one call: plan (§1–4), resample (§5, by the caller), advantages (§6)."""
    plan = plan_resampling(groups, config, step)
    continuations = list(resample(plan)) if plan.jobs else []
    return plan, continuations, build_training_rows(groups, plan, continuations, config)


def original_groups(rollouts: Iterable[Rollout]) -> list[QuestionGroup]:
    """Group original rollouts by question id, keeping first-seen order."""
    grouped: dict[str, list[Rollout]] = defaultdict(list)
    for r in rollouts:
        grouped[r.question_id].append(r)
    return [QuestionGroup(q, tuple(rs)) for q, rs in grouped.items()]

"""Signal-yield simulator: AXPO against "more rollouts" and post-observation branching.

The paper's central claim is about coverage: fixing the thinking prefix and resampling the tool
call recovers correct tool-using rollouts of all-wrong tool subgroups more cheaply than sampling
more rollouts (its "rollout 2x" baseline) or branching after the tool's observation (ARPO). This
module lets a user see that trade-off for their r, K and N before spending GPU hours.

It is a seeded stochastic *policy model*, not a language model. Read it top to bottom:

1. ``PolicyModel``   the hidden truth, one dataclass of calibrated defaults:
   per question a tool-use propensity, a no-tool accuracy and a "viability" (how often a
   tool-using thinking prefix is on the right track); per tool-using prefix a distribution over a
   few semantic clusters of tool calls (~3 per prefix, ~30% collapsed to one) and a success
   probability per (prefix, cluster).
2. ``SimulatedPolicy`` samples real ``Rollout`` records from it, token-exact: reasoning tokens,
   ``<tool_call>`` + call body + ``</tool_call>`` whose per-token log-probs come from the
   prefix's call distribution (so the core's c_s = mean p(call tokens) is low exactly when the
   prefix's calls are spread), observation tokens, answer tokens. It also draws the three kinds of
   continuation: a new call from a fixed prefix (AXPO), a new answer after a fixed observation
   (ARPO), a new answer after fixed reasoning (no-tool resampling).
3. ``STRATEGIES``     how each strategy spends its extra samples on the *same* simulated step.
   AXPO, random ranking, w/o prefix fix and no-tool resampling are ``plan_resampling`` with an
   ``AXPOConfig``: the training code path, not a re-implementation. ARPO branches the prefixes the
   same planner selected, cut after the observation instead of at ``<tool_call>``.
4. ``measure``        the metrics, read off the records: recovered all-wrong tool groups (a
   triggered question that gained a correct tool-using sample), and the share of questions whose
   rows carry a non-zero (and a positive) advantage on tool-call tokens, computed by the core's
   ``build_training_rows`` + ``token_arrays``.

What drives the numbers is named in ``PolicyModel``'s fields: a fresh rollout uses a tool only
with the question's propensity (~30%), so most of "rollout 2x" is spent on non-tool rollouts and
on questions that were never all-wrong; a continuation from a fixed tool prefix is tool-using by
construction and redraws the call's cluster; a branch after the observation keeps the (wrong)
call, so it only redraws the answer given a bad observation.

Token ids are arbitrary integers and lengths are in *simulated* tokens (short, to keep a run
fast); ratios between strategies are the meaningful part, not absolute token counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from axpo_rllm.core.advantages import build_training_rows, token_arrays
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import confidence, extra_budget, is_triggered, plan_resampling
from axpo_rllm.core.records import (
    QuestionGroup,
    ResampleJob,
    ResamplePlan,
    Rollout,
    RolloutKind,
    Termination,
    ToolCallSpan,
)
from axpo_rllm.core.step import StepOutcome, axpo_step, finish_step
from axpo_rllm.core.streaming import plan_first_come

__all__ = [
    "PolicyModel",
    "SimConfig",
    "ToolPrefix",
    "SimulatedPolicy",
    "StrategyResult",
    "SimReport",
    "STRATEGIES",
    "simulate",
    "demo_step",
    "sweep",
    "format_table",
    "format_calibration",
    "format_sweep",
    "plot",
]

TOOL_OPEN, TOOL_CLOSE = 7, 8
THINK_END = 9  # stands for </think>: the answer segment starts right after it


# ---------------------------------------------------------------------------------------------
# 1. The policy model: every knob that drives the result, with the paper-calibrated default.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyModel:
    """The hidden truth of the simulated policy (defaults calibrated to the paper's GRPO symptoms:
    ~30% tool use, ~40% all-wrong tool subgroups at N = 8, ~3 call clusters per prefix, ~30% of
    prefixes collapsed to one cluster; ``calibration`` prints what a run measured)."""

    tool_propensity: tuple[float, float] = (1.5, 3.5)
    """Beta(a, b) over questions: P(a rollout of q calls a tool). Mean 0.3: the Thinking-Acting Gap."""
    no_tool_soundness: tuple[float, float] = (2.0, 3.0)
    """Beta(a, b) over questions: P(a no-tool rollout's reasoning is sound)."""
    sound_answer_success: float = 0.9
    """P(correct | sound no-tool reasoning)."""
    unsound_answer_success: float = 0.05
    """P(correct | unsound no-tool reasoning) (a lucky guess)."""
    viability: tuple[float, float] = (3.0, 1.5)
    """Beta(a, b) over questions: P(a tool-using thinking prefix is on the right track, i.e. one of
    its call clusters is the right call). A non-viable prefix fails whatever it calls."""
    collapse_rate: float = 0.3
    """Share of tool prefixes whose call distribution has collapsed to a single cluster."""
    cluster_counts: tuple[int, ...] = (3, 4, 5, 6)
    """Number of call clusters of a non-collapsed prefix (uniform over these)."""
    cluster_concentration: float = 1.0
    """Dirichlet concentration of a non-collapsed prefix's cluster masses (1 = uniform simplex)."""
    right_call_success: tuple[float, float] = (9.0, 1.0)
    """Beta(a, b) per viable prefix: P(correct | prefix, the right call cluster) (mean 0.9)."""
    wrong_call_success: float = 0.03
    """P(correct | prefix, a wrong call cluster or a non-viable prefix): a bad observation."""
    content_token_prob: tuple[float, float] = (4.0, 1.5)
    """Beta(a, b) for the call's argument tokens inside a cluster (the noise in c_s)."""
    syntax_token_prob: tuple[float, float] = (40.0, 1.0)
    """Beta(a, b) for the call's JSON syntax tokens (nearly deterministic)."""
    # Lengths, in simulated tokens (uniform integer ranges, inclusive).
    think_tokens: tuple[int, int] = (40, 120)
    syntax_tokens: int = 6
    content_tokens: int = 3
    observation_tokens: tuple[int, int] = (16, 48)
    second_think_tokens: tuple[int, int] = (20, 60)
    answer_tokens: tuple[int, int] = (4, 12)

    def __post_init__(self) -> None:
        for name in ("collapse_rate", "sound_answer_success", "unsound_answer_success", "wrong_call_success"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PolicyModel.{name} must be a probability in [0, 1], got {value!r}")
        if not self.cluster_counts or min(self.cluster_counts) < 1:
            raise ValueError(f"PolicyModel.cluster_counts must be positive ints, got {self.cluster_counts!r}")


@dataclass(frozen=True)
class SimConfig:
    """One simulation: B questions per step, N rollouts each, AXPO's r and K, over ``steps`` steps."""

    questions: int = 128
    n: int = 8
    r: float = 0.25
    k: int = 4
    steps: int = 10
    seed: int = 0
    model: PolicyModel = field(default_factory=PolicyModel)

    def __post_init__(self) -> None:
        if self.questions < 1 or self.n < 1 or self.steps < 1:
            raise ValueError(f"SimConfig: questions, n and steps must be >= 1, got {self.questions}, {self.n}, {self.steps}")
        if extra_budget(self.r, self.questions, self.n) < self.k:
            raise ValueError(
                f"SimConfig: E = floor(r·B·N) = floor({self.r}·{self.questions}·{self.n}) is below K = {self.k}"
            )

    def axpo(self, **changes) -> AXPOConfig:
        return AXPOConfig(r=self.r, k=self.k, seed=self.seed, **changes)


# ---------------------------------------------------------------------------------------------
# 2. Sampling real Rollout records from the model.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    question_id: str
    tool_propensity: float
    no_tool_soundness: float
    viability: float
    prompt_ids: np.ndarray


@dataclass(frozen=True)
class ToolPrefix:
    """A tool-using thinking prefix's hidden call distribution."""

    masses: np.ndarray
    """P(call cluster m | prefix), sums to 1."""
    success: np.ndarray
    """P(correct | prefix, cluster m)."""
    viable: bool

    @property
    def entropy(self) -> float:
        p = self.masses[self.masses > 0]
        return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class Latent:
    """What the simulator knows about a rollout and the training code never sees."""

    prefix: ToolPrefix | None
    """The tool prefix (None for a no-tool rollout)."""
    cluster: int
    """The call cluster drawn (-1 for a no-tool rollout)."""
    sound: bool
    """No-tool rollouts: whether the reasoning was sound."""


def _beta(rng: np.random.Generator, ab: tuple[float, float], size=None):
    return rng.beta(ab[0], ab[1], size=size)


def _randint(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    """Uniform int in [lo, hi] (``Generator.integers`` costs ~50 µs a call; this is ~1 µs)."""
    return lo_hi[0] + int(rng.random() * (lo_hi[1] - lo_hi[0] + 1))


class SimulatedPolicy:
    """Draws questions, rollouts and continuations from a ``PolicyModel``; remembers each
    rollout's latent state (``latent[rollout_id]``) so continuations can condition on it."""

    def __init__(self, model: PolicyModel) -> None:
        self.model = model
        self.latent: dict[str, Latent] = {}
        m = model
        self._call_shape = (
            np.array([m.content_token_prob[0]] * m.content_tokens + [m.syntax_token_prob[0]] * m.syntax_tokens),
            np.array([m.content_token_prob[1]] * m.content_tokens + [m.syntax_token_prob[1]] * m.syntax_tokens),
            6_000 + np.arange(m.content_tokens + m.syntax_tokens + 1),
        )

    # -- questions and prefixes ----------------------------------------------------------------
    def question(self, rng: np.random.Generator, question_id: str) -> Question:
        m = self.model
        return Question(
            question_id=question_id,
            tool_propensity=float(_beta(rng, m.tool_propensity)),
            no_tool_soundness=float(_beta(rng, m.no_tool_soundness)),
            viability=float(_beta(rng, m.viability)),
            prompt_ids=10_000 + np.arange(16) + 16 * _randint(rng, (0, 10**6)),
        )

    def tool_prefix(self, rng: np.random.Generator, q: Question) -> ToolPrefix:
        m = self.model
        if rng.random() < m.collapse_rate:
            masses = np.ones(1)
        else:
            count = m.cluster_counts[_randint(rng, (0, len(m.cluster_counts) - 1))]
            masses = rng.dirichlet(np.full(count, m.cluster_concentration))
        viable = bool(rng.random() < q.viability)
        success = np.full(len(masses), m.wrong_call_success)
        if viable:
            # The right cluster is one of the prefix's clusters, uniformly: a spread prefix often
            # puts little mass on it, a collapsed one always calls it.
            success[_randint(rng, (0, len(masses) - 1))] = float(_beta(rng, m.right_call_success))
        return ToolPrefix(masses=masses, success=success, viable=viable)

    # -- token segments --------------------------------------------------------------------------
    def _reasoning(self, rng, length_range) -> tuple[np.ndarray, np.ndarray]:
        n = _randint(rng, length_range)
        # Token ids carry no meaning here (the algorithm reads masks, spans, log-probs, rewards).
        ids = 1_000 + np.arange(n) + 7 * _randint(rng, (0, 500))
        logprobs = np.log(_beta(rng, (6.0, 1.0), size=n))
        return ids, logprobs

    def _call_body(self, rng, prefix: ToolPrefix, cluster: int) -> tuple[np.ndarray, np.ndarray]:
        """The call's content after ``<tool_call>``: a cluster-choosing token (p = the cluster's
        mass), argument tokens within the cluster, JSON syntax tokens, then ``</tool_call>``."""
        a, b, ids_tail = self._call_shape
        probs = np.concatenate([[prefix.masses[cluster]], rng.beta(a, b), [0.99]])
        ids = np.concatenate([[5_000 + 100 * cluster], ids_tail + 10 * _randint(rng, (0, 99))])
        ids[-1] = TOOL_CLOSE
        return ids, np.log(np.clip(probs, 1e-6, 1.0))

    def _observation(self, rng, cluster: int) -> np.ndarray:
        return 20_000 + 1_000 * cluster + np.arange(_randint(rng, self.model.observation_tokens))

    def _answer(self, rng, closed: bool) -> tuple[np.ndarray, np.ndarray]:
        """The final answer; ``</think>`` first unless the head already closed the thinking."""
        ids, logprobs = self._reasoning(rng, self.model.answer_tokens)
        if closed:
            return ids, logprobs
        return np.concatenate([[THINK_END], ids]), np.concatenate([[-0.01], logprobs])

    # -- rollouts --------------------------------------------------------------------------------
    def rollout(self, rng: np.random.Generator, q: Question, rollout_id: str) -> Rollout:
        """One original rollout of q (the N of GRPO, or an extra one of "rollout 2x")."""
        return self._fresh(rng, q, rollout_id, RolloutKind.ORIGINAL, "")

    def fresh_continuation(self, rng: np.random.Generator, q: Question, job: ResampleJob, index: int) -> Rollout:
        """'w/o prefix fix': a fresh rollout from the question, recorded as an empty-prefix continuation."""
        return self._fresh(rng, q, f"{job.source_id}/f{index}", RolloutKind.CONTINUATION, job.source_id)

    def _fresh(self, rng, q: Question, rollout_id: str, kind: RolloutKind, source_id: str) -> Rollout:
        think_ids, think_lp = self._reasoning(rng, self.model.think_tokens)
        if rng.random() < q.tool_propensity:
            prefix = self.tool_prefix(rng, q)
            head_ids = np.concatenate([think_ids, [TOOL_OPEN]])
            head_lp = np.concatenate([think_lp, [-0.05]])
            return self._tool_tail(rng, q, rollout_id, prefix, head_ids, np.ones(len(head_ids), np.int8), head_lp,
                                   kind=kind, source_id=source_id, prefix_len=0)
        sound = bool(rng.random() < q.no_tool_soundness)
        return self._answer_tail(rng, q, rollout_id, sound, think_ids, np.ones(len(think_ids), np.int8), think_lp,
                                 kind=kind, source_id=source_id, prefix_len=0)

    def _tool_tail(self, rng, q, rollout_id, prefix: ToolPrefix, head_ids, head_mask, head_lp, *, kind, source_id,
                   prefix_len) -> Rollout:
        """From a head ending in ``<tool_call>``: draw a call cluster, the call, its observation, a
        second turn and the answer; correct with P(success | prefix, cluster)."""
        cluster = min(int(np.searchsorted(np.cumsum(prefix.masses), rng.random(), side="right")), len(prefix.masses) - 1)
        body_ids, body_lp = self._call_body(rng, prefix, cluster)
        obs = self._observation(rng, cluster)
        think2_ids, think2_lp = self._reasoning(rng, self.model.second_think_tokens)
        ans_ids, ans_lp = self._answer(rng, closed=False)
        open_at = len(head_ids) - 1
        span = ToolCallSpan(open_at, open_at + 1, open_at + 1 + len(body_ids), turn=0, name=f"tool{cluster}")
        ids = np.concatenate([head_ids, body_ids, obs, think2_ids, ans_ids])
        mask = np.concatenate([head_mask, np.ones(len(body_ids), np.int8), np.zeros(len(obs), np.int8),
                               np.ones(len(think2_ids) + len(ans_ids), np.int8)])
        logprobs = np.concatenate([head_lp, body_lp, np.zeros(len(obs)), think2_lp, ans_lp])
        correct = bool(rng.random() < prefix.success[cluster])
        self.latent[rollout_id] = Latent(prefix=prefix, cluster=cluster, sound=False)
        return Rollout(
            rollout_id=rollout_id, question_id=q.question_id, prompt_ids=q.prompt_ids,
            response_ids=ids, response_mask=mask, response_logprobs=logprobs, tool_calls=(span,),
            reward=float(correct), correct=correct, termination=Termination.ANSWER, turns=2,
            answer_start=len(ids) - len(ans_ids) + 1, kind=kind, source_id=source_id, prefix_len=prefix_len,
        )

    def _answer_tail(self, rng, q, rollout_id, sound: bool, head_ids, head_mask, head_lp, *, kind, source_id,
                     prefix_len, think_range=None, tool_calls=(), latent: Latent | None = None,
                     success: float | None = None) -> Rollout:
        """From a head (reasoning, or reasoning + call + observation): maybe more reasoning
        (``think_range``), then the answer."""
        closed = len(head_ids) > 0 and int(head_ids[-1]) == THINK_END
        more_ids, more_lp = self._reasoning(rng, think_range) if think_range else (np.zeros(0, np.int64), np.zeros(0))
        ans_ids, ans_lp = self._answer(rng, closed=closed)
        ids = np.concatenate([head_ids, more_ids, ans_ids])
        mask = np.concatenate([head_mask, np.ones(len(more_ids) + len(ans_ids), np.int8)])
        logprobs = np.concatenate([head_lp, more_lp, ans_lp])
        m = self.model
        p = success if success is not None else (m.sound_answer_success if sound else m.unsound_answer_success)
        correct = bool(rng.random() < p)
        self.latent[rollout_id] = latent if latent is not None else Latent(prefix=None, cluster=-1, sound=sound)
        return Rollout(
            rollout_id=rollout_id, question_id=q.question_id, prompt_ids=q.prompt_ids,
            response_ids=ids, response_mask=mask, response_logprobs=logprobs, tool_calls=tuple(tool_calls),
            reward=float(correct), correct=correct, termination=Termination.ANSWER, turns=2 if tool_calls else 1,
            answer_start=len(ids) - len(ans_ids) + (0 if closed else 1), kind=kind, source_id=source_id,
            prefix_len=prefix_len,
        )

    # -- continuations from a fixed prefix -------------------------------------------------------
    def tool_call_continuation(self, rng, q: Question, source: Rollout, job: ResampleJob, index: int) -> Rollout:
        """AXPO: the prefix (through ``<tool_call>``) is fixed; the call's cluster and all after are redrawn."""
        prefix = self.latent[source.rollout_id].prefix
        return self._tool_tail(rng, q, f"{source.rollout_id}/c{index}", prefix, job.prefix_ids, job.prefix_mask,
                               job.prefix_logprobs, kind=RolloutKind.CONTINUATION, source_id=source.rollout_id,
                               prefix_len=job.prefix_len)

    def observation_continuation(self, rng, q: Question, source: Rollout, job: ResampleJob, index: int) -> Rollout:
        """ARPO-style: call and observation fixed; only the second turn and the answer are redrawn,
        so success stays P(success | prefix, the source's cluster)."""
        latent = self.latent[source.rollout_id]
        return self._answer_tail(
            rng, q, f"{source.rollout_id}/b{index}", False, job.prefix_ids, job.prefix_mask, job.prefix_logprobs,
            kind=RolloutKind.CONTINUATION, source_id=source.rollout_id, prefix_len=job.prefix_len,
            think_range=self.model.second_think_tokens, tool_calls=source.tool_calls, latent=latent, success=float(latent.prefix.success[latent.cluster]),
        )

    def answer_continuation(self, rng, q: Question, source: Rollout, job: ResampleJob, index: int) -> Rollout:
        """No-tool resampling: the reasoning (through ``</think>``) is fixed; only the answer is redrawn."""
        sound = self.latent[source.rollout_id].sound
        return self._answer_tail(rng, q, f"{source.rollout_id}/a{index}", sound, job.prefix_ids,
                                 job.prefix_mask, job.prefix_logprobs, kind=RolloutKind.CONTINUATION,
                                 source_id=source.rollout_id, prefix_len=job.prefix_len)


# ---------------------------------------------------------------------------------------------
# 3. One simulated step, and how each strategy spends its extra samples on it.
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """The N original rollouts of B simulated questions: identical for every strategy."""

    index: int
    policy: SimulatedPolicy
    questions: dict[str, Question]
    groups: list[QuestionGroup]
    triggered: frozenset[str]
    """Questions whose tool subgroup is non-empty and all wrong under plain GRPO (docs/algorithm.md §1)."""

    @functools.cached_property
    def by_id(self) -> dict[str, Rollout]:
        return {r.rollout_id: r for g in self.groups for r in g.rollouts}

    @functools.cached_property
    def position(self) -> dict[str, int]:
        """Each original rollout's index in the step (keys its continuations' random stream)."""
        return {rid: i for i, rid in enumerate(self.by_id)}


def draw_step(cfg: SimConfig, index: int) -> Step:
    policy = SimulatedPolicy(cfg.model)
    q_rng = np.random.default_rng([cfg.seed, index, 0])
    r_rng = np.random.default_rng([cfg.seed, index, 1])
    questions = {f"s{index}q{i}": policy.question(q_rng, f"s{index}q{i}") for i in range(cfg.questions)}
    groups = [
        QuestionGroup(qid, tuple(policy.rollout(r_rng, q, f"{qid}-{j}") for j in range(cfg.n)))
        for qid, q in questions.items()
    ]
    triggered = frozenset(g.question_id for g in groups if is_triggered(g, "tool"))
    return Step(index, policy, questions, groups, triggered)


@dataclass
class Spend:
    """What a strategy did with its extra budget on one step, in the core's own records."""

    budget: int
    groups: list[QuestionGroup]
    """The groups it trains on (the originals, or the originals plus extra rollouts)."""
    plan: ResamplePlan
    extra: list[Rollout]
    """Every extra sample: continuations, or extra original rollouts."""
    config: AXPOConfig
    """How ``build_training_rows`` turns the records into advantages."""
    rows: list | None = None
    """The training rows when the strategy went through the core's step (else built by ``measure``)."""


EMPTY_PLAN = ResamplePlan(budget=0, jobs=(), triggered=(), candidates=())
GRPO = AXPOConfig(enable=False)


def stream(cfg: SimConfig, step: Step, kind: int, index: int) -> np.random.Generator:
    """The random stream of one draw site. Streams are keyed by *what* is drawn (the kind of
    sample, the source rollout or question), not by strategy, so two strategies that pick the same
    prefix draw the same continuations (common random numbers: AXPO vs random ranking differ only
    by what they select), and rollout (1+r)x's extra rollouts are the first ones of rollout 2x's."""
    return np.random.default_rng([cfg.seed, step.index, 2, kind, index])


TOOL_CALL, FRESH, ANSWER, AFTER_OBSERVATION, MORE_ROLLOUTS = 1, 2, 3, 4, 5


def grpo(cfg: SimConfig, step: Step) -> Spend:
    return Spend(0, step.groups, EMPTY_PLAN, [], GRPO)


def planned(axpo: AXPOConfig, kind: int) -> Callable[[SimConfig, Step], Spend]:
    """A strategy that is the core's step (``axpo_step``: plan, resample, rows) with the draw of
    each job's K samples as its resampling phase."""

    def strategy(cfg: SimConfig, step: Step) -> Spend:
        config = dataclasses.replace(axpo, r=cfg.r, k=cfg.k, seed=cfg.seed)
        outcome = axpo_step(step.groups, lambda plan: draw_jobs(cfg, step, plan, kind), config, step.index)
        return Spend(outcome.plan.budget, step.groups, outcome.plan, outcome.continuations, config, outcome.rows)

    return strategy


def arrival_order(step: Step) -> list[str]:
    """When each question's group would be complete in a real step: its longest rollout decides
    (decode time grows with tokens), ties in question order. The greedy streaming plan serves a
    round's questions in this order."""
    ends = {g.question_id: max(len(r.response_ids) for r in g.rollouts) for g in step.groups}
    return sorted(ends, key=lambda q: ends[q])  # stable: ties keep question order


def first_come(axpo: AXPOConfig, kind: int) -> Callable[[SimConfig, Step], Spend]:
    """``streaming: greedy``: the first-come breadth-first plan (``plan_first_come``) on the step's
    arrival order, then the same draws and rows as :func:`planned` (common random numbers: a prefix
    both plans pick gets the same continuations)."""

    def strategy(cfg: SimConfig, step: Step) -> Spend:
        config = dataclasses.replace(axpo, r=cfg.r, k=cfg.k, seed=cfg.seed)
        plan = plan_first_come(step.groups, arrival_order(step), config, step.index)
        outcome = finish_step(step.groups, plan, draw_jobs(cfg, step, plan, kind), config)
        return Spend(plan.budget, step.groups, plan, outcome.continuations, config, outcome.rows)

    return strategy


def demo_step(axpo: AXPOConfig, questions: int, n: int, seed: int = 0) -> StepOutcome:
    """One simulated step through the core's phases under ``axpo`` (``axpo-rllm plan-demo``): the
    continuations are drawn the way the matching strategy draws them."""
    cfg = SimConfig(questions=questions, n=n, r=axpo.r, k=axpo.k, steps=1, seed=seed)
    step = draw_step(cfg, 0)
    kind = FRESH if not axpo.prefix_fix else ANSWER if axpo.resample_target == "no_tool" else TOOL_CALL
    return axpo_step(step.groups, lambda plan: draw_jobs(cfg, step, plan, kind), axpo, step.index)


def draw_jobs(cfg: SimConfig, step: Step, plan: ResamplePlan, kind: int) -> list[Rollout]:
    """K samples per job, from the job's own stream."""
    policy, position = step.policy, step.position
    draw = {
        TOOL_CALL: lambda rng, q, source, job, i: policy.tool_call_continuation(rng, q, source, job, i),
        FRESH: lambda rng, q, source, job, i: policy.fresh_continuation(rng, q, job, i),
        ANSWER: lambda rng, q, source, job, i: policy.answer_continuation(rng, q, source, job, i),
        AFTER_OBSERVATION: lambda rng, q, source, job, i: policy.observation_continuation(rng, q, source, job, i),
    }[kind]
    extra = []
    for job in plan.jobs:
        rng = stream(cfg, step, kind, position[job.source_id])
        q, source = step.questions[job.question_id], step.by_id[job.source_id]
        extra += [draw(rng, q, source, job, i) for i in range(job.k)]
    return extra


def observation_end(rollout: Rollout) -> int:
    """First model token after the first tool call's observation (where ARPO branches)."""
    call = rollout.first_tool_call
    after = np.flatnonzero(rollout.response_mask[call.end :])
    return call.end + int(after[0]) if len(after) else len(rollout.response_ids)


def arpo(cfg: SimConfig, step: Step) -> Spend:
    """ARPO-style branching: the prefixes AXPO's planner selects, but cut after the tool's
    observation; the call (and what it returned) is kept, the rest redrawn. Scored with AXPO's
    advantage rules (continuation groups + prefix credit), so only the branching point differs."""
    config = cfg.axpo()
    plan = plan_resampling(step.groups, config, step.index)
    jobs = []
    for job in plan.jobs:
        source = step.by_id[job.source_id]
        cut = observation_end(source)
        jobs.append(dataclasses.replace(
            job, prefix_ids=source.response_ids[:cut], prefix_mask=source.response_mask[:cut],
            prefix_logprobs=source.response_logprobs[:cut], images=source.images_before(cut), turns_used=2,
        ))
    plan = dataclasses.replace(plan, jobs=tuple(jobs))
    return Spend(plan.budget, step.groups, plan, draw_jobs(cfg, step, plan, AFTER_OBSERVATION), config)


def more_rollouts(per_question: Callable[[SimConfig], int | None]) -> Callable[[SimConfig, Step], Spend]:
    """GRPO with bigger groups: the extra samples are ordinary rollouts from the question, spread
    evenly over the B questions (``per_question`` None: E = floor(r·B·N) in all)."""

    def strategy(cfg: SimConfig, step: Step) -> Spend:
        each = per_question(cfg)
        budget = each * cfg.questions if each is not None else extra_budget(cfg.r, cfg.questions, cfg.n)
        base, left = divmod(budget, cfg.questions)
        groups, extra = [], []
        for i, group in enumerate(step.groups):
            q, rng = step.questions[group.question_id], stream(cfg, step, MORE_ROLLOUTS, i)
            more = [step.policy.rollout(rng, q, f"{group.question_id}-x{j}") for j in range(base + (i < left))]
            extra += more
            groups.append(QuestionGroup(group.question_id, group.rollouts + tuple(more)))
        return Spend(budget, groups, EMPTY_PLAN, extra, GRPO)

    return strategy


STRATEGIES: dict[str, Callable[[SimConfig, Step], Spend]] = {
    "GRPO (N, no extra)": grpo,
    "AXPO (uncertainty rank)": planned(AXPOConfig(), TOOL_CALL),
    "AXPO, random rank": planned(AXPOConfig(ranking="random"), TOOL_CALL),
    "AXPO, greedy streaming (first come)": first_come(AXPOConfig(streaming="greedy"), TOOL_CALL),
    "w/o prefix fix (fresh, targeted)": planned(AXPOConfig(prefix_fix=False), FRESH),
    "ARPO: branch after observation": arpo,
    "no-tool resampling": planned(AXPOConfig(resample_target="no_tool"), ANSWER),
    "rollout (1+r)x": more_rollouts(lambda cfg: None),
    "rollout 2x": more_rollouts(lambda cfg: cfg.n),
}
"""Every strategy gets the same simulated step; all but the rollout-2x baseline spend at most
E = floor(r·B·N). Keys are the table's row names."""

GRPO_ROW, AXPO_ROW, RANDOM_ROW, DOUBLE_ROW, ONE_PLUS_R_ROW, GREEDY_ROW = (
    "GRPO (N, no extra)", "AXPO (uncertainty rank)", "AXPO, random rank", "rollout 2x", "rollout (1+r)x",
    "AXPO, greedy streaming (first come)")


# ---------------------------------------------------------------------------------------------
# 4. Metrics, read off the records.
# ---------------------------------------------------------------------------------------------
@dataclass
class StrategyResult:
    """Sums over the run's steps for one strategy."""

    name: str
    budget: int = 0
    extra_used: int = 0
    extra_tokens: int = 0
    extra_tool: int = 0
    """Extra samples that are tool-using."""
    extra_on_triggered: int = 0
    """Extra samples spent on questions with an all-wrong tool subgroup."""
    hits_on_triggered: int = 0
    """...of which tool-using and correct."""
    triggered: int = 0
    recovered: int = 0
    """Triggered questions that gained at least one correct tool-using sample."""
    prefixes: int = 0
    """Prefixes selected by the planner (planned strategies only)."""
    prefixes_recovered: int = 0
    """...of which at least one sample came back tool-using and correct."""
    questions: int = 0
    signal_nonzero: int = 0
    """Questions with some row's advantage != 0 on a tool-call token."""
    signal_positive: int = 0
    """Questions with some row's advantage > 0 on a tool-call token."""

    @staticmethod
    def _ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    @property
    def recovered_per_100(self) -> float:
        return 100.0 * self._ratio(self.recovered, self.extra_used)

    @property
    def share_nonzero(self) -> float:
        return self._ratio(self.signal_nonzero, self.questions)

    @property
    def share_positive(self) -> float:
        return self._ratio(self.signal_positive, self.questions)

    @property
    def tool_share(self) -> float:
        return self._ratio(self.extra_tool, self.extra_used)

    @property
    def on_triggered_share(self) -> float:
        return self._ratio(self.extra_on_triggered, self.extra_used)

    @property
    def hit_rate(self) -> float:
        return self._ratio(self.hits_on_triggered, self.extra_on_triggered)

    @property
    def tokens_per_recovered(self) -> float:
        return self._ratio(self.extra_tokens, self.recovered)


def tool_call_signal(rows) -> tuple[set[str], set[str]]:
    """Question ids whose rows carry a non-zero / a positive advantage on a tool-call token
    (``[open_start, end)`` of any call: the opener that decides to call, and the call's content)."""
    advantages, _ = token_arrays(rows)
    adv = advantages.numpy()
    nonzero, positive = set(), set()
    for i, row in enumerate(rows):
        for span in row.rollout.tool_calls:
            window = adv[i, span.open_start : span.end]
            if (window != 0).any():
                nonzero.add(row.rollout.question_id)
            if (window > 0).any():
                positive.add(row.rollout.question_id)
    return nonzero, positive


def measure(result: StrategyResult, step: Step, spend: Spend) -> None:
    """Add one step's numbers to ``result``."""
    if spend.budget and len(spend.extra) > spend.budget:
        raise AssertionError(f"{result.name} spent {len(spend.extra)} extra samples over its budget {spend.budget}")
    result.budget += spend.budget
    result.extra_used += len(spend.extra)
    result.extra_tokens += sum(len(x.response_ids) - x.prefix_len for x in spend.extra)
    result.extra_tool += sum(x.used_tool for x in spend.extra)
    on_triggered = [x for x in spend.extra if x.question_id in step.triggered]
    result.extra_on_triggered += len(on_triggered)
    hits = [x for x in on_triggered if x.used_tool and x.correct]
    result.hits_on_triggered += len(hits)
    result.triggered += len(step.triggered)
    result.recovered += len({x.question_id for x in hits})
    result.prefixes += len(spend.plan.jobs)
    result.prefixes_recovered += len({x.source_id for x in hits if x.kind is RolloutKind.CONTINUATION})
    rows = spend.rows if spend.rows is not None else build_training_rows(
        spend.groups, spend.plan, [x for x in spend.extra if x.kind is RolloutKind.CONTINUATION], spend.config)
    nonzero, positive = tool_call_signal(rows)
    result.questions += len(step.groups)
    result.signal_nonzero += len(nonzero)
    result.signal_positive += len(positive)


# ---------------------------------------------------------------------------------------------
# 5. A run: calibration + every strategy on the same steps.
# ---------------------------------------------------------------------------------------------
def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return float("nan")
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass
class Calibration:
    """What plain GRPO at N measured on the simulated questions (the paper's symptoms), and the
    model's hidden drivers."""

    tool_use_rate: float
    all_wrong_rate: float
    acc_tool: float
    acc_no_tool: float
    clusters_per_prefix: float
    collapsed_share: float
    c_entropy_spearman: float
    viable_share: float
    viable_share_in_all_wrong: float
    triggered_per_step: float

    TARGETS = {"tool_use_rate": 0.30, "all_wrong_rate": 0.40, "clusters_per_prefix": 3.0, "collapsed_share": 0.30}


def calibrate(steps: Sequence[Step]) -> Calibration:
    originals = [r for s in steps for g in s.groups for r in g.rollouts]
    tool = [r for r in originals if r.used_tool]
    with_tool = [g for s in steps for g in s.groups if g.tool_subgroup]
    latent = {rid: lat for s in steps for rid, lat in s.policy.latent.items()}
    prefixes = [latent[r.rollout_id].prefix for r in tool]
    in_all_wrong = [latent[r.rollout_id].prefix for s in steps for g in s.groups if g.question_id in s.triggered
                    for r in g.tool_subgroup]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    return Calibration(
        tool_use_rate=mean([r.used_tool for r in originals]),
        all_wrong_rate=mean([is_triggered(g, "tool") for g in with_tool]),
        acc_tool=mean([r.correct for r in tool]),
        acc_no_tool=mean([r.correct for r in originals if not r.used_tool]),
        clusters_per_prefix=mean([int((p.masses >= 0.05).sum()) for p in prefixes]),
        collapsed_share=mean([float(p.masses.max() >= 0.9) for p in prefixes]),
        c_entropy_spearman=_spearman([confidence(r) for r in tool], [p.entropy for p in prefixes]),
        viable_share=mean([p.viable for p in prefixes]),
        viable_share_in_all_wrong=mean([p.viable for p in in_all_wrong]),
        triggered_per_step=mean([len(s.triggered) for s in steps]),
    )


@dataclass
class SimReport:
    config: SimConfig
    calibration: Calibration
    results: dict[str, StrategyResult]
    ranking: dict[str, float]
    """``ranking_check``: expected P(recovery) of the selected prefixes per ranking switch."""

    @property
    def axpo_vs_double(self) -> float:
        """AXPO's recovered groups per extra sample over rollout 2x's (the issue's goal: >= 2)."""
        a, d = self.results[AXPO_ROW].recovered_per_100, self.results[DOUBLE_ROW].recovered_per_100
        return a / d if d else float("nan")


def simulate(cfg: SimConfig = SimConfig(), strategies: Sequence[str] | None = None) -> SimReport:
    """Run every strategy (or the named ones) on the same ``cfg.steps`` simulated steps."""
    names = list(STRATEGIES) if strategies is None else list(strategies)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    results = {name: StrategyResult(name) for name in names}
    steps = []
    for index in range(cfg.steps):
        step = draw_step(cfg, index)
        steps.append(step)
        for name in STRATEGIES:
            if name in results:
                measure(results[name], step, STRATEGIES[name](cfg, step))
    return SimReport(cfg, calibrate(steps), results, ranking_check(cfg, steps))


def ranking_check(cfg: SimConfig, steps: Sequence[Step]) -> dict[str, float]:
    """Noise-free view of the ranking (from the hidden truth): the mean probability that a selected
    prefix's K continuations hold a correct one, 1 − (1 − Σ_m π_m s_m)^K, per ranking switch."""
    out = {}
    for ranking in ("uncertainty", "random", "confidence"):
        chances = []
        for step in steps:
            for job in plan_resampling(step.groups, cfg.axpo(ranking=ranking), step.index).jobs:
                p = step.policy.latent[job.source_id].prefix
                chances.append(1.0 - (1.0 - float(p.masses @ p.success)) ** job.k)
        out[ranking] = float(np.mean(chances)) if chances else float("nan")
    return out


def sweep(
    base: SimConfig = SimConfig(),
    values: dict[str, Sequence] | None = None,
    strategies: Sequence[str] = ("GRPO (N, no extra)", AXPO_ROW, RANDOM_ROW, "w/o prefix fix (fresh, targeted)",
                                 ONE_PLUS_R_ROW, DOUBLE_ROW),
) -> list[tuple[str, object, SimReport]]:
    """Vary r, K and N one at a time around ``base`` (same seed, same model): (field, value, report)."""
    values = values if values is not None else {"r": (0.125, 0.25, 0.5), "k": (2, 4, 8), "n": (4, 8, 16)}
    out, done = [], {}
    for name, options in values.items():
        for value in options:
            cfg = dataclasses.replace(base, **{name: value})
            if cfg not in done:  # the base point recurs once per knob: run it once
                done[cfg] = simulate(cfg, strategies)
            out.append((name, value, done[cfg]))
    return out


# ---------------------------------------------------------------------------------------------
# 6. Output: the table (markdown, so docs can paste it), the calibration, the sweep, the PNG.
# ---------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_table(report: SimReport) -> str:
    cfg = report.config
    header = ["strategy", "extra used / budget", "on all-wrong q", "tool-using", "tool & correct",
              "prefixes recovered", "recovered groups", "recovered / 100 extra", "tool-call A≠0", "tool-call A>0",
              "A>0 questions gained / 100 extra", "extra tokens", "tokens / recovered"]
    rows = []
    base = report.results.get(GRPO_ROW)
    for r in report.results.values():
        # net: questions whose tool calls gained a positive advantage, less those that lost it
        gain = (100 * (r.signal_positive - base.signal_positive) / r.extra_used
                if base is not None and r.extra_used else float("nan"))
        rows.append([
            r.name, f"{r.extra_used} / {r.budget}", _pct(r.on_triggered_share), _pct(r.tool_share), _pct(r.hit_rate),
            "-" if not r.prefixes else f"{r.prefixes_recovered} / {r.prefixes}",
            f"{r.recovered} / {r.triggered}", _num(r.recovered_per_100), _pct(r.share_nonzero), _pct(r.share_positive),
            "-" if math.isnan(gain) else f"{gain:+.2f}", f"{r.extra_tokens}", _num(r.tokens_per_recovered, 0),
        ])
    title = (f"Signal yield: B={cfg.questions} questions x N={cfg.n} rollouts, r={cfg.r}, K={cfg.k}, "
             f"{cfg.steps} steps, seed {cfg.seed} (E = floor(r·B·N) = {extra_budget(cfg.r, cfg.questions, cfg.n)} per step)")
    note = ""
    if AXPO_ROW in report.results and DOUBLE_ROW in report.results:
        note = (f"\nAXPO / rollout 2x, recovered all-wrong tool groups per extra sample: "
                f"{_num(report.axpo_vs_double)}x")
    if report.ranking:
        note += ("\nRanking check (hidden truth, no sampling noise): P(a selected prefix's K continuations hold a "
                 "correct one) = " + ", ".join(f"{k} {_num(v, 3)}" for k, v in report.ranking.items()))
    return f"{title}\n\n{_markdown(header, rows)}{note}"


def format_calibration(report: SimReport) -> str:
    c, cfg = report.calibration, report.config
    t = Calibration.TARGETS
    lines = [
        ("tool-use rate (rollouts with >= 1 call)", _num(c.tool_use_rate, 3), f"~{t['tool_use_rate']:.2f}"),
        ("all-wrong rate (questions with a tool subgroup: all of it wrong)", _num(c.all_wrong_rate, 3),
         f"~{t['all_wrong_rate']:.2f}"),
        ("call clusters per tool prefix (mass >= 5%)", _num(c.clusters_per_prefix), f"~{t['clusters_per_prefix']:.0f}"),
        ("tool prefixes collapsed to one cluster (mass >= 90%)", _num(c.collapsed_share), f"~{t['collapsed_share']:.2f}"),
        ("accuracy: tool / no-tool rollouts", f"{_num(c.acc_tool)} / {_num(c.acc_no_tool)}", ""),
        ("Spearman(c_s, entropy of the prefix's call distribution)", _num(c.c_entropy_spearman), "< 0"),
        ("viable tool prefixes: all / in all-wrong tool subgroups", f"{_num(c.viable_share)} / {_num(c.viable_share_in_all_wrong)}", ""),
        ("all-wrong tool groups per step", _num(c.triggered_per_step, 1), ""),
    ]
    header = f"Calibration: plain GRPO, N={cfg.n}, {cfg.questions * cfg.steps} simulated questions"
    return header + "\n\n" + _markdown(["quantity", "measured", "paper"], [list(x) for x in lines])


def format_sweep(points: Sequence[tuple[str, object, SimReport]]) -> str:
    header = ["vary", "E / step", "AXPO", "random rank", "fresh, targeted", "rollout (1+r)x", "rollout 2x",
              "AXPO / 2x", "A>0: GRPO", "A>0: AXPO", "A>0: 2x"]
    rows = []
    for name, value, rep in points:
        res, cfg = rep.results, rep.config
        per = lambda key: _num(res[key].recovered_per_100) if key in res else "-"  # noqa: E731
        pos = lambda key: _pct(res[key].share_positive) if key in res else "-"  # noqa: E731
        rows.append([f"{'K' if name == 'k' else 'N' if name == 'n' else name}={value}",
                     str(extra_budget(cfg.r, cfg.questions, cfg.n)), per(AXPO_ROW), per(RANDOM_ROW),
                     per("w/o prefix fix (fresh, targeted)"), per(ONE_PLUS_R_ROW), per(DOUBLE_ROW),
                     _num(rep.axpo_vs_double) + "x", pos("GRPO (N, no extra)"), pos(AXPO_ROW), pos(DOUBLE_ROW)])
    return ("Sweep (one knob at a time; recovered all-wrong tool groups per 100 extra samples; "
            "A>0 = share of questions with a positive advantage on tool-call tokens)\n\n" + _markdown(header, rows))


def plot(report: SimReport, path: str, points: Sequence[tuple[str, object, SimReport]] = ()) -> str:
    """A small PNG: recovered groups per 100 extra samples, tool-call signal, and the sweep's AXPO/2x ratio."""
    import matplotlib  # optional (the `plot` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display here

    results = [r for r in report.results.values() if r.extra_used]
    panels = 3 if points else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), dpi=90)
    names = [r.name.replace(" (", "\n(").replace(": ", ":\n") for r in results]
    colors = ["tab:red" if r.name.startswith("AXPO") else "tab:gray" for r in results]
    axes[0].barh(names, [r.recovered_per_100 for r in results], color=colors)
    axes[0].set_xlabel("recovered all-wrong tool groups\nper 100 extra samples")
    axes[0].invert_yaxis()
    everyone = list(report.results.values())
    y = np.arange(len(everyone))
    axes[1].barh(y, [r.share_nonzero for r in everyone], color="lightgray", label="A≠0")
    axes[1].barh(y, [r.share_positive for r in everyone], color="tab:blue", label="A>0")
    axes[1].set_yticks(y, [r.name.replace(" (", "\n(").replace(": ", ":\n") for r in everyone], fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("share of questions with advantage\non tool-call tokens")
    axes[1].legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    axes[0].tick_params(axis="y", labelsize=7)
    if points:
        labels = [f"{'K' if n == 'k' else 'N' if n == 'n' else n}={v}" for n, v, _ in points]
        ratios = [rep.axpo_vs_double for _, _, rep in points]
        axes[2].bar(labels, [0.0 if math.isnan(x) else x for x in ratios], color="tab:red")
        axes[2].axhline(2.0, color="black", lw=0.8, ls="--")
        axes[2].set_ylabel("AXPO / rollout 2x\n(recovered per extra sample)")
        axes[2].tick_params(axis="x", labelrotation=45, labelsize=7)
    cfg = report.config
    fig.suptitle(f"AXPO signal yield (simulated): B={cfg.questions}, N={cfg.n}, r={cfg.r}, K={cfg.k}, "
                 f"{cfg.steps} steps, seed {cfg.seed}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

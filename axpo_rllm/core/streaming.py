"""Streaming AXPO planning: start the continuations whose selection is already certain while
phase 1 is still running (issue 14: phase 3 used to wait for the slowest rollout of the batch).

The batch plan, restated as an order
------------------------------------
``allocate_breadth_first`` spends E in S = floor(E / K) slots. It orders every candidate prefix by
(round j, rank key, question position) (§4: round j holds each triggered question's j-th ranked
prefix; ties keep input order) and takes the first S. So a candidate x of question q, in round j
with key k, is selected iff fewer than S candidates come before it:

    ahead(x) = sum over all questions u of min(m_u, j)                 (rounds < j; q's own gives j)
             + #{u != q : m_u > j and (key_u[j], pos_u) < (k, pos_q)}  (round j, ahead by key)

where m_u is u's number of candidates (0 unless triggered) and key_u[j] its j-th ranked key.

The exact rule
--------------
While some questions are still running, replace each unknown term by its largest value over every
completion of the batch consistent with what is known; x is *certain* (released, its K
continuations start now) iff that bound is < S. Sound term by term: the true ahead(x) is never
above the bound, and the plan never changes. The bounds, per question u:

- u done (its N rollouts graded): m_u and its keys exact. Under ``random`` ranking its keys are
  its draws at offset o_u = the number of candidates of the questions before it (that is how
  ``collect_candidates`` draws them), so they are known once every earlier question's m is known.
- u running: m_u <= cap_u = 0 if a graded rollout of u's target subgroup is correct (u can no
  longer trigger), else (graded eligible sources) + (ungraded rollouts). An ungraded rollout that
  has made its first tool call (``observe_call``: c_s is fixed from that call on) has a known key;
  the g_u others have free keys. u's round-j key can be made arbitrarily small when j < g_u; for
  j >= g_u it is at least the (j - g_u)-th smallest known key (free keys all tiny is the worst case).
  A reported call binds the rollout: the workflow does not retry a rollout after its call was
  reported (a retry would be another rollout), and the planner checks the key at the grade.
- u not yet seen (the rllm coordinator does not know the step's question ids): m_u <= N, any key,
  any position.

Each bound is attained by one completion (every ungraded rollout wrong, tool-using and eligible,
the free ones with tiny keys), the same for every candidate, so with keys known the rule is
necessary as well as sufficient: no exact rule can release more from the same information
(property-tested against that completion). Two special cases:
round 0 is released once (questions ahead of it by key, done) + (questions still running) < S,
i.e. the issue's rule (triggered with candidates so far) + (running) <= S is implied; a later round
j is released once every question's rounds < j plus round-j rivals provably fit.

``random`` ranking: a done question whose offset is still open has unknown keys: it counts as a
rival in every round it reaches, and its own prefixes are released only when their round is the
same for every possible offset (always, for a question with one candidate; checked over the
offset range otherwise, while it is short), counting as behind every known key.

The greedy variant (``streaming: greedy``)
------------------------------------------
Not exact: a different, documented plan (:func:`plan_first_come`). Rounds stay breadth-first and
each question keeps its own rank order, but within a round questions take slots in the order
their groups *arrive* (first come), not by rank key. Then a question that is still running is
never ahead of an arrived one in the same round, so round 0 is taken on arrival while slots last,
and round j once the rounds < j of every question (running ones at their cap) and the round-j
prefixes of earlier arrivals fit. It ignores the uncertainty rank across questions in the last
partly filled round only; the simulator measures the cost in recovered groups per extra sample.

Speculation (``speculation: group | rollout``, with ``exact``)
--------------------------------------------------------------
Certainty comes late: a round-0 prefix is certain only once fewer than S questions can still put a
prefix ahead of it, i.e. near the end of phase 1. Speculation starts *likely* prefixes earlier
without changing what is trained: after every event the planner computes the optimistic plan, the
batch plan of what is known so far as if nothing more would trigger (``group``: the complete
triggered questions; ``rollout``: also, for each question still running that can still trigger,
its graded eligible sources so far), and keeps exactly (certain prefixes) ∪ (optimistic plan)
started: a prefix that enters it starts, one that leaves it is cancelled (it may come back and
start again). The final plan is still ``plan_resampling``'s; a speculatively started prefix it
takes keeps its continuations, which are the ones the barrier would draw (a continuation's seed is
its source and index, not its start time); one it does not take was cancelled. The cost is compute
only, never an extra sample: ``speculated`` (starts before certainty) and ``wasted`` (cancelled
starts) are counted. Inert under ``random`` ranking (its keys depend on every earlier question).

Framework-neutral: records in, ``ResampleJob`` s out. The final plan of ``exact`` (and ``off``) is
``plan_resampling``'s own, and every released job is checked against it field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from axpo_rllm.core.config import AXPOConfig, Speculation, Streaming
from axpo_rllm.core.planner import (
    allocate_breadth_first,
    check_groups,
    collect_candidates,
    confidence,
    eligible_sources,
    is_eligible_source,
    is_triggered,
    make_job,
    plan_resampling,
    prefix_len,
    rank_key,
    step_budget,
)
from axpo_rllm.core.records import Candidate, QuestionGroup, ResampleJob, ResamplePlan, Rollout, RolloutKind, rollouts_by_id

__all__ = ["StreamingPlanner", "plan_first_come"]

_MAX_OFFSET_RANGE = 64
"""Random ranking: a done question's rounds are checked over at most this many possible offsets
(each costs an argsort of its keys); beyond it only a single-candidate question is released."""


def plan_first_come(groups: Sequence[QuestionGroup], arrival: Sequence[str], config: AXPOConfig, step: int = 0) -> ResamplePlan:
    """The greedy variant's plan: §4's breadth-first rounds, K per prefix, each question's prefixes
    in their rank order, but inside a round questions are served in ``arrival`` order (first come)
    instead of by rank key. Candidates and ``random`` draws are ``plan_resampling``'s."""
    group_size = check_groups(groups)
    if not config.enable:
        return ResamplePlan(budget=0, jobs=(), triggered=(), candidates=())
    come = {q: i for i, q in enumerate(arrival)}
    missing = [g.question_id for g in groups if g.question_id not in come]
    if missing or len(come) != len(groups):
        raise ValueError(f"arrival must list every question of the step once; missing {missing}, got {len(arrival)} ids")
    budget = step_budget(config, len(groups), group_size)
    triggered, candidates = collect_candidates(groups, config, np.random.default_rng([config.seed, step]))
    by_arrival = {q: [dataclasses.replace(c, rank_key=float(come[q])) for c in cands] for q, cands in candidates.items()}
    ranked = {c.source_id: c for cands in candidates.values() for c in cands}
    by_id = rollouts_by_id([r for g in groups for r in g.rollouts])
    jobs = tuple(
        make_job(by_id[c.source_id], ranked[c.source_id], round_, config)
        for c, round_ in allocate_breadth_first(by_arrival, budget, config.k)
    )
    return ResamplePlan(budget=budget, jobs=jobs, triggered=triggered,
                        candidates=tuple(c for q in triggered for c in candidates.get(q, ())))


@dataclass
class _Question:
    """What the planner knows about one question of the step."""

    question_id: str
    graded: dict[str, Rollout] = field(default_factory=dict)
    """Rollouts graded so far (while running)."""
    untriggered: bool = False
    """A graded rollout of the target subgroup is correct: the trigger can no longer fire."""
    graded_eligible: int = 0
    graded_keys: list[float] = field(default_factory=list)
    """Rank keys of the graded eligible sources (uncertainty / confidence ranking), sorted."""
    calls: dict[str, float] = field(default_factory=dict)
    """Ungraded rollouts that have made their first tool call: rollout id -> the rank key it will
    have as a source (fixed from that call on)."""
    group: QuestionGroup | None = None
    sources: list[tuple[Rollout, float]] = field(default_factory=list)
    """Done: the eligible sources if triggered (the candidates), in group order, with c_s."""
    arrival: int = -1
    ranked: list[Candidate] | None = None
    """Done, keys known: the candidates in rank order (round j = index j)."""
    released: set[str] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return self.group is not None

    def bound(self, n: int) -> int:
        """m (done) or its upper bound cap (running)."""
        if self.done:
            return len(self.sources)
        return 0 if self.untriggered else self.graded_eligible + n - len(self.graded)

    def keys(self) -> list[float]:
        """Every known key a running question's candidates will have (graded and in-flight callers), sorted."""
        return sorted(self.graded_keys + list(self.calls.values())) if self.calls else self.graded_keys

    def open(self, n: int) -> bool:
        """Running, still able to trigger, with a rollout whose key is free: a rival in round 0 of
        any key (and, with a candidate to come, in every later round)."""
        return not self.done and n - len(self.graded) - len(self.calls) > 0 and self.bound(n) > 0

    def determined(self, n: int) -> bool:
        return self.done or self.bound(n) == 0


class StreamingPlanner:
    """One step's plan, decided as the question groups come in (module docstring: the rules).

    ``observe(rollout)`` (optional) reports one graded rollout of a question still running;
    ``add(group)`` reports a question's complete group. Both return the jobs that became certain
    (of any question; each job is returned once). ``finish()`` after the last group returns the
    step's plan: ``plan_resampling``'s for ``exact`` / ``off``, ``plan_first_come``'s for ``greedy``,
    with the released job objects in it.

    ``order``: the step's question ids in the order the plan sees them (the workflow's task order).
    None: the order is sorted question ids and the ids are learnt as they come (the rllm
    coordinator, which only knows the number of questions).
    """

    def __init__(self, config: AXPOConfig, num_questions: int, group_size: int, step: int = 0,
                 order: Sequence[str] | None = None, mode: Streaming | None = None,
                 speculation: Speculation | None = None) -> None:
        self.config = config
        self.mode: Streaming = config.streaming if mode is None else mode
        if self.mode not in ("off", "exact", "greedy"):
            raise ValueError(f"streaming mode must be off|exact|greedy, got {self.mode!r}")
        spec = config.speculation if speculation is None else speculation
        if spec not in ("off", "group", "rollout"):
            raise ValueError(f"speculation must be off|group|rollout, got {spec!r}")
        self.speculation: Speculation = spec if (self.mode == "exact" and config.enable and config.ranking != "random") else "off"
        self._started: dict[str, ResampleJob] = {}
        """Jobs whose continuations run now or ran (certain ones and speculative ones not cancelled)."""
        self._to_cancel: list[str] = []
        self.speculated = 0
        """Starts made before the prefix was certain."""
        self.wasted = 0
        """Speculative starts cancelled (their continuations are thrown away)."""
        if num_questions < 1 or group_size < 1:
            raise ValueError(f"a step needs >= 1 question and >= 1 rollout each, got B={num_questions}, N={group_size}")
        if order is not None and (len(order) != num_questions or len(set(order)) != len(order)):
            raise ValueError(f"order must list the step's {num_questions} question ids once each, got {list(order)}")
        self.num_questions, self.group_size, self.step = num_questions, group_size, step
        self.order = tuple(order) if order is not None else None
        self.budget = step_budget(config, num_questions, group_size) if config.enable else 0
        self.slots = self.budget // config.k if config.enable else 0
        self._questions: dict[str, _Question] = {q: _Question(q) for q in self.order or ()}
        self._open = num_questions
        """Questions with ungraded rollouts that may still trigger (unseen ones included): each may
        put >= 1 candidate ahead of any other (round 0 with a tiny key, or a round below), so
        nothing is certain while they alone fill the slots."""
        self._arrived: list[str] = []
        self._released: dict[str, ResampleJob] = {}
        self._draws: np.ndarray | None = None
        self._ranges: dict[str, tuple[int, int]] = {}
        if config.enable and config.ranking == "random":
            # plan_resampling's stream, drawn ahead: at most N candidates per question.
            self._draws = np.random.default_rng([config.seed, step]).random(num_questions * group_size)

    # -- events ----------------------------------------------------------------------------------
    @property
    def released(self) -> list[ResampleJob]:
        """Every job released as certain so far, in release order."""
        return list(self._released.values())

    @property
    def started(self) -> list[ResampleJob]:
        """The jobs running now (certain, and speculative ones not cancelled), in start order."""
        return list(self._started.values())

    def take_cancelled(self) -> list[str]:
        """Job ids whose continuations must be stopped and dropped (speculation only); each once."""
        out, self._to_cancel = self._to_cancel, []
        return out

    @property
    def done(self) -> bool:
        return len(self._arrived) == self.num_questions

    def observe(self, rollout: Rollout) -> list[ResampleJob]:
        """One graded original rollout of a question whose group is not complete yet."""
        if rollout.kind is not RolloutKind.ORIGINAL:
            raise ValueError(f"observe() takes original rollouts, got continuation {rollout.rollout_id}")
        q = self._question(rollout.question_id)
        if q.done:
            raise ValueError(f"question {q.question_id!r} is already complete; {rollout.rollout_id} came after its group")
        if rollout.rollout_id in q.graded:
            raise ValueError(f"rollout {rollout.rollout_id!r} observed twice")
        if len(q.graded) >= self.group_size:
            raise ValueError(f"question {q.question_id!r} has more than N = {self.group_size} rollouts")
        before, was_open = q.bound(self.group_size), q.open(self.group_size)
        q.graded[rollout.rollout_id] = rollout
        called = q.calls.pop(rollout.rollout_id, None)
        target, keys_changed = self.config.resample_target, called is not None
        if _in_target(rollout, target):
            q.untriggered = q.untriggered or rollout.correct
            if is_eligible_source(rollout, target):
                q.graded_eligible += 1
                if self.config.ranking != "random":
                    key = _key(confidence(rollout, target), self.config.ranking)
                    if called is not None and called != key:
                        raise RuntimeError(f"rollout {rollout.rollout_id}: its first call was reported with key {called!r}, "
                                           f"it is {key!r} as a source (report the call from the final attempt only)")
                    q.graded_keys = sorted(q.graded_keys + [key])
                    keys_changed = True
        after = q.bound(self.group_size)
        self._open += q.open(self.group_size) - was_open
        return self._follow(self._evaluate()) if after != before or keys_changed else []

    def observe_call(self, question_id: str, rollout_id: str, confidence: float | None) -> list[ResampleJob]:
        """An ungraded original rollout has made its first tool call, with c_s = ``confidence``
        (None: the rollout was restarted, forget the call). Sharpens the bound on its question:
        that rollout can no longer bring an arbitrarily small key. Used with the ``tool`` target and
        a non-random ranking (ignored otherwise: c_s is not the key there)."""
        if self.config.resample_target != "tool" or self.config.ranking == "random":
            return []
        q = self._question(question_id)
        if q.done or rollout_id in q.graded:
            raise ValueError(f"rollout {rollout_id!r} of {question_id!r} is graded already; its call comes too late")
        was_open = q.open(self.group_size)
        if confidence is None:
            q.calls.pop(rollout_id, None)
            self._open += q.open(self.group_size) - was_open
            return []  # a forgotten call only loosens the bound: nothing new can be certain
        if rollout_id in q.calls:
            raise ValueError(f"rollout {rollout_id!r}: its first call was reported twice")
        if len(q.calls) + len(q.graded) >= self.group_size:
            raise ValueError(f"question {question_id!r} has more than N = {self.group_size} rollouts")
        q.calls[rollout_id] = _key(confidence, self.config.ranking)
        self._open += q.open(self.group_size) - was_open
        return self._follow(self._evaluate())

    def add(self, group: QuestionGroup) -> list[ResampleJob]:
        """A question's complete group (its N rollouts, failed ones included)."""
        if len(group.rollouts) != self.group_size:
            raise ValueError(f"question {group.question_id!r} has {len(group.rollouts)} rollouts, expected N = {self.group_size}")
        q = self._question(group.question_id)
        if q.done:
            raise ValueError(f"question {group.question_id!r} added twice")
        self._open -= q.open(self.group_size)
        q.calls.clear()
        q.group = group
        q.arrival = len(self._arrived)
        self._arrived.append(q.question_id)
        q.sources = eligible_sources(group, self.config.resample_target) if is_triggered(group, self.config.resample_target) else []
        if self.config.ranking != "random":
            q.ranked = self._rank(q.question_id, q.sources, [_key(c, self.config.ranking) for _, c in q.sources])
        return self._follow(self._evaluate())

    def finish(self) -> ResamplePlan:
        """The step's plan, once every group is in; the released jobs must all be in it."""
        if not self.done:
            raise ValueError(f"finish() before the step is complete: {len(self._arrived)} of {self.num_questions} groups")
        ids = self.order if self.order is not None else tuple(sorted(self._questions))
        groups = [self._questions[q].group for q in ids]
        if self.mode == "greedy":
            plan = plan_first_come(groups, self._arrived, self.config, self.step)
        else:
            plan = plan_resampling(groups, self.config, self.step)
        planned = {job.job_id: job for job in plan.jobs}
        for job_id, job in self._released.items():
            if job_id not in planned or _signature(planned[job_id]) != _signature(job):
                raise RuntimeError(
                    f"streaming planner ({self.mode}) released {job_id} (round {job.round}), which the step's plan "
                    f"{'selects differently' if job_id in planned else 'does not select'}: a bug in the release rule"
                )
        for job_id, job in list(self._started.items()):
            if job_id not in planned:  # a speculative start the plan did not take
                self._cancel(job_id)
            elif _signature(planned[job_id], with_round=False) != _signature(job, with_round=False):
                raise RuntimeError(f"speculative start {job_id} asks for other continuations than the plan's job")
        # Certain jobs keep their released objects; a speculative start the plan takes gets the plan's
        # job (its round may differ from the optimistic plan's; the continuations it asked for do not).
        return dataclasses.replace(plan, jobs=tuple(self._released.get(job.job_id, job) for job in plan.jobs))

    def remaining(self, plan: ResamplePlan) -> list[ResampleJob]:
        """The plan's jobs not started before the barrier, in plan order."""
        return [job for job in plan.jobs if job.job_id not in self._started]

    # -- the rule --------------------------------------------------------------------------------
    def _question(self, question_id: str) -> _Question:
        q = self._questions.get(question_id)
        if q is None:
            if self.order is not None:
                raise ValueError(f"question {question_id!r} is not one of the step's {self.num_questions} questions")
            if len(self._questions) >= self.num_questions:
                raise ValueError(f"question {question_id!r} would be question {len(self._questions) + 1} of a "
                                 f"{self.num_questions}-question step")
            q = self._questions[question_id] = _Question(question_id)
        return q

    def _rank(self, question_id: str, sources: Sequence[tuple[Rollout, float]], keys: Sequence[float]) -> list[Candidate]:
        """``sources`` (with c_s) as candidates with these rank keys, in rank order."""
        target = self.config.resample_target
        found = [
            Candidate(question_id, s.rollout_id, prefix_len(s, target), c, float(key))
            for (s, c), key in zip(sources, keys)
        ]
        return sorted(found, key=lambda cand: cand.rank_key)

    def _positions(self) -> dict[str, int]:
        ids = self.order if self.order is not None else sorted(self._questions)
        return {q: i for i, q in enumerate(ids)}

    def _evaluate(self) -> list[ResampleJob]:
        if self.mode == "off" or not self.config.enable or len(self._released) >= self.slots:
            return []
        if self.mode == "exact" and self._open >= self.slots:  # each open question is >= 1 ahead of anything
            return []
        waiting = [q for q in self._questions.values() if q.done and len(q.released) < len(q.sources)]
        if not waiting:
            return []
        n, qs = self.group_size, list(self._questions.values())
        unseen = self.num_questions - len(qs)
        pos = self._positions()
        bound = {q.question_id: q.bound(n) for q in qs}
        if self._draws is not None:
            self._place_random_keys(qs, pos, bound, unseen)

        # The candidates to test, by round: (question, candidate, key); key None = not known yet (random).
        tests: list[list[tuple[_Question, Candidate, float | None]]] = [[] for _ in range(n)]
        for q in waiting:
            if q.ranked is not None:
                pairs = [(c, j, c.rank_key) for j, c in enumerate(q.ranked)]
            else:
                pairs = [(c, j, None) for c, j in self._fixed_rounds(q, pos, bound, unseen)]
            for c, j, key in pairs:
                if c.source_id not in q.released:
                    tests[j].append((q, c, key))

        greedy, randomly = self.mode == "greedy", self._draws is not None
        rounds = np.arange(n + 1)
        m = np.fromiter(bound.values(), dtype=np.int64, count=len(bound))
        below = np.minimum(m[:, None], rounds[None, :]).sum(axis=0) + unseen * np.minimum(n, rounds)
        rivals = np.zeros(n + 1, dtype=np.int64)  # round-j rivals that may beat any key
        keyed: list[list[tuple[float, int]]] = [[] for _ in range(n + 1)]  # round-j rivals with a known (key, pos)
        for q in qs:
            b, p = bound[q.question_id], pos[q.question_id]
            if greedy:  # first come: only earlier arrivals are rivals inside a round
                if q.done:
                    for j in range(b):
                        keyed[j].append((float(q.arrival), q.arrival))
            elif q.done and q.ranked is not None:
                for j, c in enumerate(q.ranked):
                    keyed[j].append((c.rank_key, p))
            elif q.done or randomly:
                rivals[:b] += 1
            else:
                g = n - len(q.graded) - len(q.calls)  # rollouts whose key is still free
                known = q.keys()
                rivals[: min(g, b)] += 1
                for j in range(g, b):  # round j >= g: at best the (j - g)-th known key, the free ones all below
                    keyed[j].append((known[j - g], p))
        if not greedy:
            rivals[:n] += unseen

        out = []
        for j, round_tests in enumerate(tests):
            if not round_tests:
                continue
            if greedy:
                k = np.array([float(q.arrival) for q, _, _ in round_tests])
                p = np.array([q.arrival for q, _, _ in round_tests])
                own = np.zeros(len(round_tests), dtype=np.int64)
            else:
                k = np.array([np.inf if key is None else key for _, _, key in round_tests])
                p = np.array([-1 if key is None else pos[q.question_id] for q, _, key in round_tests])
                own = np.array([key is None for _, _, key in round_tests], dtype=np.int64)  # counted as a rival above
            ahead = below[j] + rivals[j] - own
            if keyed[j]:
                rk, rp = (np.array(col) for col in zip(*keyed[j]))
                ahead = ahead + ((rk[None, :] < k[:, None]) | ((rk[None, :] == k[:, None]) & (rp[None, :] < p[:, None]))).sum(axis=1)
            for (q, cand, _), a in zip(round_tests, ahead):
                if a < self.slots:
                    source = next(s for s, _ in q.sources if s.rollout_id == cand.source_id)
                    job = make_job(source, cand, j, self.config)
                    q.released.add(cand.source_id)
                    self._released[job.job_id] = job
                    out.append(job)
        return out

    # -- speculation ---------------------------------------------------------------------------------
    def _follow(self, certain: list[ResampleJob]) -> list[ResampleJob]:
        """Keep (certain) ∪ (optimistic plan) started: returns the jobs to start now and queues the
        ones to cancel (:meth:`take_cancelled`). Without speculation: the certain jobs."""
        if self.speculation == "off":
            for job in certain:
                self._started[job.job_id] = job
            return certain
        optimistic = self._optimistic_jobs()
        start = []
        for job in certain:
            if job.job_id not in self._started:
                self._started[job.job_id] = job
                start.append(job)
        for job_id, job in optimistic.items():
            if job_id not in self._started:
                self._started[job_id] = job
                self.speculated += 1
                start.append(job)
        for job_id in list(self._started):
            if job_id not in self._released and job_id not in optimistic:
                self._cancel(job_id)
        return start

    def _cancel(self, job_id: str) -> None:
        del self._started[job_id]
        self.wasted += 1
        self._to_cancel.append(job_id)

    def _optimistic_jobs(self) -> dict[str, ResampleJob]:
        """The batch plan of what is known now, as if nothing more would trigger (module docstring)."""
        target, pos = self.config.resample_target, self._positions()
        candidates: dict[str, list[Candidate]] = {}
        sources: dict[str, Rollout] = {}
        for qid in sorted(self._questions, key=pos.get):
            q = self._questions[qid]
            if q.done:
                if q.ranked:
                    candidates[qid] = q.ranked
                    sources.update((s.rollout_id, s) for s, _ in q.sources)
            elif self.speculation == "rollout" and not q.untriggered and q.graded_eligible:
                found = [(s, confidence(s, target)) for s in q.graded.values() if _in_target(s, target) and is_eligible_source(s, target)]
                candidates[qid] = self._rank(qid, found, [_key(c, self.config.ranking) for _, c in found])
                sources.update((s.rollout_id, s) for s, _ in found)
        jobs = (make_job(sources[c.source_id], c, round_, self.config)
                for c, round_ in allocate_breadth_first(candidates, self.budget, self.config.k))
        return {job.job_id: job for job in jobs}

    # -- random ranking: keys are draws at an offset fixed by the earlier questions ---------------
    def _offset_ranges(self, qs, pos, bound, unseen) -> dict[str, tuple[int, int]]:
        """Per known question: the range of its possible draw offsets (candidates of the questions before it)."""
        lo = hi = 0
        out = {}
        for q in sorted(qs, key=lambda u: pos[u.question_id]):
            out[q.question_id] = (lo, hi + unseen * self.group_size)
            b = bound[q.question_id]
            lo += b if q.determined(self.group_size) else 0
            hi += b
        return out

    def _place_random_keys(self, qs, pos, bound, unseen) -> None:
        self._ranges = self._offset_ranges(qs, pos, bound, unseen)
        for q in qs:
            if q.done and q.ranked is None:
                lo, hi = self._ranges[q.question_id]
                if lo == hi:
                    q.ranked = self._rank(q.question_id, q.sources, self._draws[lo: lo + len(q.sources)].tolist())

    def _fixed_rounds(self, q: _Question, pos, bound, unseen) -> list[tuple[Candidate, int]]:
        """Random ranking, offset still open: the candidates whose round is the same at every offset."""
        m = len(q.sources)
        target = self.config.resample_target
        cands = [Candidate(q.question_id, s.rollout_id, prefix_len(s, target), c, float("nan")) for s, c in q.sources]
        if m == 1:
            return [(cands[0], 0)]
        lo, hi = self._ranges[q.question_id]
        if hi - lo + 1 > _MAX_OFFSET_RANGE:
            return []
        windows = self._draws[np.arange(lo, hi + 1)[:, None] + np.arange(m)[None, :]]
        rounds = np.argsort(np.argsort(windows, axis=1, kind="stable"), axis=1)  # stable: ties keep group order
        fixed = (rounds == rounds[:1]).all(axis=0)
        return [(cands[e], int(rounds[0, e])) for e in range(m) if fixed[e]]


def _key(c: float, ranking) -> float:
    """The rank key of a non-random ranking (``rank_key`` without a generator)."""
    return rank_key(c, ranking, None)  # type: ignore[arg-type]  # only ``random`` reads the generator


def _in_target(rollout: Rollout, target) -> bool:
    return rollout.used_tool if target == "tool" else not rollout.used_tool


def _signature(job: ResampleJob, with_round: bool = True) -> tuple:
    """What a job asks for; ``with_round`` False: the continuations only (a speculative start's round
    may differ from the final plan's)."""
    return (job.job_id, job.question_id, job.source_id, job.round if with_round else None, job.k, job.confidence, job.turns_used,
            job.request_ids.tobytes(), job.prefix_mask.tobytes(), job.prefix_logprobs.tobytes(),
            tuple(id(im) for im in job.images))

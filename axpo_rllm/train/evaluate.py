"""Pass@1 / Pass@k, tool use and malformed calls per benchmark (docs/algorithm.md §9: the paper's metrics).

Pass@1 is the mean accuracy over the ``n`` samples of each question, averaged over questions;
Pass@k uses the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` for ``c``
correct of ``n >= k`` samples. The samples are the agent's own multi-turn episodes (the workflow's
phase 1 with AXPO off, rollout sampling parameters), so evaluation sees exactly what training
sees. Every number is reported per benchmark (``Task.metadata["benchmark"]``, or the synthetic
tasks' ``family``), over all questions, and averaged over benchmarks (the paper's "Avg").

One sample is one :class:`~axpo_rllm.core.samples.SampleRecord`. With an output folder each finished sample is appended to
``samples.jsonl`` at once, so an interrupted evaluation resumes where it stopped: the same
``(seed, task, sample index)`` gives the same seed, so a resumed run equals an uninterrupted one.
A sample that ended in an engine/env error is scored (wrong, counted) but not cached: a resume
retries it. ``eval_config.json`` holds what the samples depend on; resuming with other settings
is refused. Questions are loaded (their images decoded) only when their first sample starts.

:func:`evaluate` (the embedded job) and ``axpo-rllm eval`` run the same :func:`evaluate_items`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from axpo_rllm.agents.agent import AgentConfig, Episode
from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.records import QuestionGroup, Rollout, Task
from axpo_rllm.core.samples import SampleRecord
from axpo_rllm.engines.base import RolloutEngine

__all__ = [
    "EVAL_STEP",
    "pass_at_k",
    "SampleRecord",
    "EvalItem",
    "EvalResult",
    "SampleCache",
    "score_samples",
    "group_scores",
    "markdown_table",
    "rollout_messages",
    "evaluate_items",
    "evaluate",
]

EVAL_STEP = 10_000
"""The step number evaluation samples are seeded with (disjoint from training steps' seeds)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct out of ``n`` samples (needs ``n >= k``)."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class EvalItem:
    """One question to evaluate; ``load`` builds its :class:`Task` (decoding images) when its turn comes."""

    benchmark: str
    task_id: str
    load: Callable[[], Task]

    @classmethod
    def of(cls, task: Task) -> "EvalItem":
        return cls(benchmark_of(task), task.task_id, lambda: task)


def benchmark_of(task: Task) -> str:
    meta = task.metadata
    return str(meta.get("benchmark") or meta.get("family") or "all")


@dataclass
class EvalResult:
    scores: dict[str, Any]
    """Flat ``eval/...`` keys (:func:`score_samples`) plus ``by_benchmark`` / ``average`` / ``all`` tables."""
    samples: list[SampleRecord]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """``(benchmark, task_id, why)`` of questions that could not be loaded (``skip_bad``)."""
    resumed: int = 0
    """Samples taken from the cache instead of being run."""


# --------------------------------------------------------------------------------------------
# Scores


def _metric_name(benchmark: str) -> str:
    return benchmark.replace("/", "_")


def _block(questions: Sequence[Sequence[SampleRecord]], k: int) -> dict[str, float]:
    rows = []
    for samples in questions:
        n, c = len(samples), sum(s.correct for s in samples)
        rows.append((c / n, pass_at_k(n, c, k), float(np.mean([s.used_tool for s in samples]))))
    flat = [s for q in questions for s in q]
    calls = sum(s.tool_calls for s in flat)
    tool_acc = [float(s.correct) for s in flat if s.used_tool]
    direct_acc = [float(s.correct) for s in flat if not s.used_tool]
    arr = np.asarray(rows)
    return {
        "pass@1": float(arr[:, 0].mean()),
        f"pass@{k}": float(arr[:, 1].mean()),
        "tool_use_rate": float(arr[:, 2].mean()),
        "malformed_call_rate": sum(s.malformed_calls for s in flat) / calls if calls else math.nan,
        "mean_turns": float(np.mean([s.turns for s in flat])),
        "acc_tool": float(np.mean(tool_acc)) if tool_acc else math.nan,
        "acc_no_tool": float(np.mean(direct_acc)) if direct_acc else math.nan,
        "questions": float(len(questions)),
        "samples": float(len(flat)),
        "failed_rollouts": float(sum(s.failed for s in flat)),
    }


_AVERAGED = ("pass@1", "pass@{k}", "tool_use_rate", "malformed_call_rate", "mean_turns")


def score_samples(samples: Iterable[SampleRecord], k: int = 4) -> dict[str, Any]:
    """Scores per benchmark (``eval/<benchmark>/...``), over all questions (``eval/...``) and the
    mean over benchmarks (``eval/avg/...``); also as nested tables under ``by_benchmark``,
    ``all`` and ``average``. Every question needs at least ``k`` samples.

    ``malformed_call_rate`` is malformed calls over attempted calls (NaN without calls);
    ``tool_use_rate`` the share of samples with at least one call.
    """
    by_question: dict[tuple[str, str], list[SampleRecord]] = defaultdict(list)
    for s in samples:
        by_question[(s.benchmark, s.task_id)].append(s)
    if not by_question:
        raise ValueError("no samples to score")
    by_benchmark: dict[str, list[list[SampleRecord]]] = defaultdict(list)
    for (bench, _), group in by_question.items():
        by_benchmark[bench].append(sorted(group, key=lambda s: s.sample))
    tables = {bench: _block(questions, k) for bench, questions in sorted(by_benchmark.items())}
    overall = _block([q for qs in by_benchmark.values() for q in qs], k)
    average = {}
    for name in (m.format(k=k) for m in _AVERAGED):
        values = [t[name] for t in tables.values() if not math.isnan(t[name])]
        average[name] = float(np.mean(values)) if values else math.nan
    average["benchmarks"] = float(len(tables))
    average["questions"] = overall["questions"]
    out: dict[str, Any] = {f"eval/{key}": value for key, value in overall.items()}
    for bench, table in tables.items():
        out.update({f"eval/{_metric_name(bench)}/{key}": value for key, value in table.items()})
    out.update({f"eval/avg/{key}": value for key, value in average.items()})
    out["by_benchmark"], out["all"], out["average"], out["k"] = tables, overall, average, k
    return out


def flat_scores(scores: Mapping[str, Any]) -> dict[str, float]:
    """Only the flat ``eval/...`` floats (what the trainer logs)."""
    return {key: value for key, value in scores.items() if key.startswith("eval/")}


def _record_of_rollout(benchmark: str, rollout: Rollout, index: int) -> SampleRecord:
    malformed = sum(not span.valid for span in rollout.tool_calls)
    return SampleRecord(benchmark, rollout.question_id, index, bool(rollout.correct), float(rollout.reward),
                        len(rollout.tool_calls), malformed, rollout.turns, rollout.termination.value, rollout.error)


def group_scores(groups: Sequence[QuestionGroup], family: Callable[[str], str], k: int = 4) -> dict[str, float]:
    """:func:`score_samples` of already sampled question groups, ``family(question_id)`` as the benchmark."""
    records = [_record_of_rollout(family(g.question_id), r, i) for g in groups for i, r in enumerate(g.rollouts)]
    return flat_scores(score_samples(records, k))


def _fmt(x: float, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def markdown_table(scores: Mapping[str, Any]) -> str:
    """The paper's table: one row per benchmark, then the mean over benchmarks and all questions."""
    k = scores["k"]
    head = f"| benchmark | questions | Pass@1 | Pass@{k} | tool use | malformed calls | mean turns | failed |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, t: Mapping[str, float], failed: str) -> str:
        return (f"| {name} | {int(t['questions'])} | {_fmt(t['pass@1'])} | {_fmt(t[f'pass@{k}'])} | {_fmt(t['tool_use_rate'])} | "
                f"{_fmt(t['malformed_call_rate'])} | {_fmt(t['mean_turns'], pct=False)} | {failed} |")

    for bench, table in scores["by_benchmark"].items():
        lines.append(row(bench, table, str(int(table["failed_rollouts"]))))
    lines.append(row(f"**average** ({int(scores['average']['benchmarks'])} benchmarks)", scores["average"], ""))
    lines.append(row("all questions", scores["all"], str(int(scores["all"]["failed_rollouts"]))))
    return "\n".join(lines) + "\n\nPass@1, Pass@k, tool use and malformed calls in %; malformed calls per attempted call.\n"


# --------------------------------------------------------------------------------------------
# Rollouts as chat messages (recorded for SFT export)


_TOOL_RESPONSE_RE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.DOTALL)


def _runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i, bool(mask[start])))
            start = i
    return runs


def rollout_messages(rollout: Rollout, chat: ChatFormat, final_turn_hint: str | None = None) -> tuple[list[dict], list[Any]]:
    """The assistant and tool turns after the prompt as chat messages, and the images tools returned.

    Assistant content is the model's decoded text (``<think>``, ``<tool_call>`` kept); a tool turn
    is the ``<tool_response>`` text followed by one ``<image>`` per returned image, as the agent
    renders it; the agent's last-turn hint becomes a user message.
    """
    messages: list[dict] = []
    returned = [img for img, off in zip(rollout.images, rollout.image_offsets) if off >= 0]
    images: list[Any] = []
    for start, end, is_model in _runs(rollout.response_mask):
        ids = rollout.response_ids[start:end]
        if is_model:
            messages.append({"role": "assistant", "content": chat.decode(ids)})
            continue
        text = chat.decode(ids)
        match = _TOOL_RESPONSE_RE.search(text)
        if match is None:
            raise ValueError(f"rollout {rollout.rollout_id}: observation tokens [{start}, {end}) hold no <tool_response> block: {text[:120]!r}")
        n_images = int(sum(1 for t in ids if t == chat.image_pad_id))
        messages.append({"role": "tool", "content": match.group(1) + "<image>" * n_images})
        images += returned[len(images) : len(images) + n_images]
        if final_turn_hint and final_turn_hint in text[match.end() :]:
            messages.append({"role": "user", "content": final_turn_hint})
    return messages, images


# --------------------------------------------------------------------------------------------
# The cache


class SampleCache:
    """``samples.jsonl`` + ``eval_config.json`` in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, fingerprint: Mapping[str, Any], fresh: bool = False) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "samples.jsonl"
        config_path = self.dir / "eval_config.json"
        fingerprint = json.loads(json.dumps(dict(fingerprint), default=str))
        if fresh:
            for stale in (self.path, config_path):
                stale.unlink(missing_ok=True)
            shutil.rmtree(self.dir / "images", ignore_errors=True)
        if config_path.exists():
            before = json.loads(config_path.read_text())
            changed = sorted(key for key in set(before) | set(fingerprint) if before.get(key) != fingerprint.get(key))
            if changed:
                raise ValueError(
                    f"{self.dir} holds samples of an evaluation with other settings (changed: {', '.join(changed)}); "
                    "use another output folder, or --fresh to discard them"
                )
        elif self.path.exists():
            raise ValueError(f"{self.path} exists without eval_config.json; use another output folder or --fresh")
        config_path.write_text(json.dumps(fingerprint, indent=2))
        self.done: dict[tuple[str, str, int], SampleRecord] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-write: drop the partial last line
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = SampleRecord.from_json(line, origin=f"{self.path}, line {n}")
            except ValueError as e:
                raise ValueError(f"{self.path}, line {n}: not a sample record ({e}); use --fresh to start over") from None
            self.done[record.key] = record

    def append(self, record: SampleRecord) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record.key] = record

    def image_path(self, record: SampleRecord, j: int) -> Path:
        digest = hashlib.blake2b(f"{record.benchmark}\0{record.task_id}".encode(), digest_size=6).hexdigest()
        folder = self.dir / "images"
        folder.mkdir(exist_ok=True)
        return folder / f"{digest}-s{record.sample}-{j}.png"


# --------------------------------------------------------------------------------------------
# Running


def _sample(benchmark: str, task_id: str, index: int, episode: Episode, chat: ChatFormat) -> SampleRecord:
    r = episode.rollout
    model_runs = [(s, e) for s, e, m in _runs(r.response_mask) if m]
    last = chat.decode(r.response_ids[model_runs[-1][0] : model_runs[-1][1]]) if model_runs else ""
    stats = episode.stats
    return SampleRecord(
        benchmark, task_id, index, bool(r.correct), float(r.reward), stats.tool_calls + stats.malformed_calls,
        stats.malformed_calls, r.turns, r.termination.value, r.error, last[-2000:],
    )


def _make_progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    progress = Progress(TextColumn("[bold]eval[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    bar = progress.add_task("samples", total=total, completed=done)
    return progress, bar


async def _arun(
    workflow: AXPOWorkflow,
    chat: ChatFormat,
    items: Sequence[EvalItem],
    n: int,
    cache: SampleCache | None,
    record: bool,
    skip_bad: bool,
    questions_in_flight: int,
    progress,
) -> tuple[list[SampleRecord], list[tuple[str, str, str]]]:
    limit = asyncio.Semaphore(workflow.config.max_concurrency)
    questions = asyncio.Semaphore(max(1, questions_in_flight))
    counters: Counter[str] = Counter()
    results: list[SampleRecord] = []
    skipped: list[tuple[str, str, str]] = []
    hint = workflow.config.agent.final_turn_hint if workflow.config.agent.cap_policy == "force_answer" else None

    async def one_question(item: EvalItem) -> None:
        cached = cache.done if cache is not None else {}
        todo = [i for i in range(n) if (item.benchmark, item.task_id, i) not in cached]
        results.extend(cached[(item.benchmark, item.task_id, i)] for i in range(n) if i not in todo)
        if not todo:
            return
        async with questions:
            try:
                task = await asyncio.to_thread(item.load)  # decoding images off the event loop
            except Exception as e:  # noqa: BLE001 - a bad question is reported with its reason, or stops the run
                if not skip_bad:
                    raise
                skipped.append((item.benchmark, item.task_id, str(e)))
                if progress is not None:
                    progress[0].advance(progress[1], len(todo))
                return

            async def one_sample(i: int) -> None:
                episode = await workflow.original(task, i, EVAL_STEP, limit, counters)
                rec = _sample(item.benchmark, item.task_id, i, episode, chat)
                if record and cache is not None and not rec.failed:
                    messages, images = rollout_messages(episode.rollout, chat, hint)
                    names = []
                    for j, im in enumerate(images):
                        path = cache.image_path(rec, j)
                        im.save(path, format="PNG")
                        names.append(path.name)
                    rec.messages, rec.tool_images = messages, names
                results.append(rec)
                if cache is not None and not rec.failed:  # an errored sample is retried on resume
                    cache.append(rec)
                if progress is not None:
                    progress[0].advance(progress[1])

            await asyncio.gather(*(one_sample(i) for i in todo))

    await asyncio.gather(*(one_question(item) for item in items))
    return results, skipped


def evaluate_items(
    engine: RolloutEngine,
    chat: ChatFormat,
    env_factory: Callable[[], Any],
    items: Sequence[EvalItem],
    *,
    n: int = 4,
    k: int = 4,
    agent_config: AgentConfig | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    fresh: bool = False,
    record: bool = False,
    skip_bad: bool = False,
    progress: bool = False,
    max_concurrency: int = 64,
    questions_in_flight: int | None = None,
) -> EvalResult:
    """Sample ``n`` episodes per question (cached in ``out_dir`` when given) and score them (Pass@1, Pass@``k``).

    ``fingerprint``: whatever else the samples depend on (model, engine, data files); with
    ``n``, ``seed`` and the agent config it must match an existing cache to resume.
    ``record``: keep each sample's turns and tool images (for ``axpo-rllm data sft-export``).
    """
    if not items:
        raise ValueError("evaluate needs at least one question")
    if n < k:
        raise ValueError(f"Pass@{k} needs n >= {k} samples per question, got n={n}")
    keys = [(i.benchmark, i.task_id) for i in items]
    if len(set(keys)) != len(keys):
        dupes = sorted({key for key, c in Counter(keys).items() if c > 1})[:5]
        raise ValueError(f"questions repeat (benchmark, task_id): {dupes}")
    agent_config = agent_config or AgentConfig()
    config = WorkflowConfig(n=n, axpo=AXPOConfig(enable=False), agent=agent_config, seed=seed, max_concurrency=max_concurrency)
    workflow = AXPOWorkflow(engine, chat, env_factory, config)
    cache = None
    if out_dir is not None:
        full = {"n": n, "seed": seed, "agent": asdict(agent_config), "eval_step": EVAL_STEP, **dict(fingerprint or {})}
        cache = SampleCache(out_dir, full, fresh=fresh)
    resumed = sum(1 for it in items for i in range(n) if cache is not None and (it.benchmark, it.task_id, i) in cache.done)
    bar = _make_progress(len(items) * n, resumed, progress)
    in_flight = questions_in_flight or max(1, max_concurrency // n)
    if bar is not None:
        with bar[0]:
            samples, skipped = asyncio.run(_arun(workflow, chat, items, n, cache, record, skip_bad, in_flight, bar))
    else:
        samples, skipped = asyncio.run(_arun(workflow, chat, items, n, cache, record, skip_bad, in_flight, None))
    if not samples:
        raise ValueError(f"no question could be evaluated ({len(skipped)} skipped: {skipped[:3]})")
    scores = score_samples(samples, k)
    scores["eval/skipped_questions"] = float(len(skipped))
    order = {key: i for i, key in enumerate(keys)}
    samples.sort(key=lambda s: (order[(s.benchmark, s.task_id)], s.sample))
    return EvalResult(scores, samples, skipped, resumed)


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
    progress: bool = False,
) -> dict[str, float]:
    """``k`` samples per task with the current policy, scored (the embedded job's held-out evaluation).

    ``chunk`` questions are sampled at a time. Flat ``eval/...`` keys, per family and overall.
    """
    if not tasks:
        raise ValueError("evaluate needs at least one task")
    result = evaluate_items(engine, chat, env_factory, [EvalItem.of(t) for t in tasks], n=k, k=k,
                            agent_config=agent_config, seed=seed, questions_in_flight=chunk, max_concurrency=chunk * k,
                            progress=progress)
    return flat_scores(result.scores)

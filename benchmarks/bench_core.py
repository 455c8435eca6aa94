"""Planner + advantages for one step, side by side with verl's GRPO on the same batch.

B = 256 questions, N = 8, responses up to 4,096 tokens, 30% tool use, 40% all-wrong tool groups,
r = 0.25, K = 4, one CPU thread. Target: AXPO planner + advantages <= 20 ms per step.

    python benchmarks/bench_core.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from axpo_rllm.core.advantages import build_training_rows, token_arrays
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import plan_resampling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # test helpers (not shipped)
from synthetic_rollouts import make_continuation, random_step  # noqa: E402


def timed(fn, repeats):
    """Best-of CPU time of this thread, in ms: the cost on one core, robust to a busy machine
    (the machines here have 2 cores shared with other work; wall time is printed beside it)."""
    fn()  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return min(cpu) * 1e3, statistics.median(wall) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-response", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    groups = random_step(args.questions, args.n, max_response=args.max_response, tool_rate=0.3, all_wrong_rate=0.4, seed=0)
    cfg = AXPOConfig(r=0.25, k=4)
    plan = plan_resampling(groups, cfg)
    by_id = {r.rollout_id: r for g in groups for r in g.rollouts}
    conts = [
        make_continuation(by_id[j.source_id], j.prefix_len, i, correct=(i == 0), new_tokens=256)
        for j in plan.jobs
        for i in range(j.k)
    ]
    width = max(len(r.response_ids) for r in list(by_id.values()) + conts)

    def axpo_step():
        return build_training_rows(groups, plan_resampling(groups, cfg), conts, cfg)

    def axpo_step_dense():
        return token_arrays(axpo_step(), width)

    originals = [r for g in groups for r in g.rollouts]
    rewards = torch.zeros(len(originals), width)
    mask = torch.zeros(len(originals), width)
    for i, r in enumerate(originals):
        n = len(r.response_ids)
        rewards[i, n - 1] = r.reward
        mask[i, :n] = torch.from_numpy(r.response_mask.astype(np.float32))
    uid = np.array([r.question_id for r in originals], dtype=object)

    def verl_grpo():
        return compute_grpo_outcome_advantage(rewards, mask, uid)

    gc.freeze()  # the step's records are long-lived: keep the collector from re-walking them
    plan_ms = timed(lambda: plan_resampling(groups, cfg), args.repeats)
    axpo_ms = timed(axpo_step, args.repeats)
    dense_ms = timed(axpo_step_dense, args.repeats)
    grpo_ms = timed(verl_grpo, args.repeats)
    tokens = sum(len(r.response_ids) for r in originals)
    print(f"step: B={args.questions} N={args.n} rows={len(originals)}+{len(conts)} continuations, "
          f"{tokens / 1e6:.2f}M response tokens, R={width}, 1 thread")
    print(f"triggered={len(plan.triggered)} candidates={len(plan.candidates)} selected={len(plan.jobs)} "
          f"E={plan.budget} used={plan.used}")
    print(f"{'what':<58}{'CPU ms (best)':>14}{'wall ms (median)':>18}")
    for name, (cpu, wall) in [
        ("AXPO planner (§1-§4)", plan_ms),
        ("AXPO planner + advantages (§1-§6, per-row segments)", axpo_ms),
        ("  + dense (bs, R) advantage / loss-mask tensors", dense_ms),
        ("verl GRPO on the originals (compute_grpo_outcome_advantage)", grpo_ms),
    ]:
        print(f"{name:<58}{cpu:>14.2f}{wall:>18.2f}")
    print(f"ratio AXPO planner+advantages / verl GRPO (CPU): {axpo_ms[0] / grpo_ms[0]:.2f}x; "
          f"with dense tensors: {dense_ms[0] / grpo_ms[0]:.2f}x")
    print(f"target planner + advantages <= 20 ms on one core: {'met' if axpo_ms[0] <= 20 else 'NOT met'} ({axpo_ms[0]:.1f} ms)")


if __name__ == "__main__":
    main()

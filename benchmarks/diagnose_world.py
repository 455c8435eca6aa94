"""The recovery chain of the embedded job's SFT checkpoint, per tool family (issue: why recovery is low).

Builds (or reuses, from the SFT cache) the checkpoint ``axpo-rllm main`` would train from, with the
same config layers and ``key=value`` overrides, then samples on *train* questions of the tool
families (:mod:`axpo_rllm.demo.diagnose`): tool use, P(right | direct answer), P(right call |
prefix), P(right answer | right call), the all-wrong share and the recovery a prefix can expect.

    .venv/bin/python benchmarks/diagnose_world.py [--questions 16] [--n 8] [--k 4] [key=value ...]
    .venv/bin/python benchmarks/diagnose_world.py --families crop,code,search tasks.world=synthetic \
        tasks.teacher_right_call_share=1.0 tasks.teacher_direct_share=0.4 tasks.sft_mix=null \
        tasks.asked=null eval.families=null 'tools.names=[crop,python,search]' tools.search_top_k=2
        # the earlier synthetic world

Measured figures: docs/benchmarks.md ("The recovery chain, sampled").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from axpo_rllm.demo.diagnose import diagnose, format_diagnosis
from axpo_rllm.demo.main_job import Runtime, _agent_config, eval_families, job_config, stage_sft
from axpo_rllm.demo.world import TOOL_OF_FAMILY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16, help="train questions per tool family")
    ap.add_argument("--n", type=int, default=8, help="rollouts per question (phase 1)")
    ap.add_argument("--k", type=int, default=4, help="calls resampled per prefix")
    ap.add_argument("--checkpoint", default=None, help="diagnose this SFT checkpoint folder instead")
    ap.add_argument("--families", default=None,
                    help="tool families to sample, comma-separated (default: those the job evaluates)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as for axpo-rllm main")
    args = ap.parse_args()
    cfg = job_config(None, args.overrides)
    families = args.families.split(",") if args.families else list(dict.fromkeys(
        f for f in eval_families(cfg) if f in TOOL_OF_FAMILY))
    torch.set_num_threads(int(cfg.job.threads))
    torch.manual_seed(int(cfg.job.seed))
    started = time.perf_counter()
    with Runtime(cfg) as rt:
        rt.build_model()
        if args.checkpoint:
            rt.load(Path(args.checkpoint))
        else:
            sft = stage_sft(rt, print)
            print(f"SFT ({'cached' if sft.get('cached') else 'trained'}): tool calls {sft['after']['tool_call_share']:.2f}")
        tasks = [t for i in range(args.questions) for t in (rt.world.make(f, "train", 10_000 + i) for f in families)]
        figures = diagnose(rt.engine, rt.chat, rt.env, rt.world, tasks, _agent_config(cfg), n=args.n, k=args.k,
                           seed=int(cfg.job.seed), log=print)
    print(format_diagnosis(figures, args.k))
    print(f"({time.perf_counter() - started:.0f}s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

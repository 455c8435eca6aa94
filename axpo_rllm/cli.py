"""``axpo-rllm``: the command line.

    axpo-rllm plan-demo [--ablation NAME] [key=value ...]   plan + advantages on a synthetic step
    axpo-rllm simulate [--sweep] [--png PATH] [...]          signal-yield simulator: AXPO vs more rollouts / ARPO
    axpo-rllm main                                           the embedded CPU job
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def plan_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from axpo_rllm.algorithm import build_training_rows, check_groups, plan_resampling
    from axpo_rllm.config import axpo_config, load_config
    from axpo_rllm.diagnostics import step_diagnostics
    from axpo_rllm.synthetic import make_continuation, random_step

    cfg = load_config(args.ablation, args.overrides)
    axpo = axpo_config(cfg)
    groups = random_step(args.questions, int(cfg.actor_rollout_ref.rollout.n), max_response=args.max_response, seed=args.seed)
    check_groups(groups)
    plan = plan_resampling(groups, axpo)
    by_id = {r.rollout_id: r for g in groups for r in g.rollouts}
    # Synthetic continuations: the first continuation of every other prefix recovers.
    continuations = [
        make_continuation(by_id[job.source_id], job.cut, i, correct=(i == 0 and n % 2 == 0))
        for n, job in enumerate(plan.jobs)
        for i in range(job.k)
    ]
    rows = build_training_rows(groups, plan, continuations, axpo)
    console = Console()
    table = Table(title=f"AXPO plan on a synthetic step (B={len(groups)}, N={len(groups[0].rollouts)}, ablation={args.ablation or 'none'})")
    table.add_column("diagnostic")
    table.add_column("value", justify="right")
    for key, value in step_diagnostics(groups, plan, continuations, axpo).items():
        table.add_row(key, f"{value:.4g}")
    table.add_row("training rows", str(len(rows)))
    console.print(table)
    return 0


def run_main(args: argparse.Namespace) -> int:
    """The embedded CPU job. Until the training pipeline lands it runs the planning demo."""
    try:
        from axpo_rllm.main_job import run  # type: ignore[import-not-found]
    except ImportError:
        return plan_demo(argparse.Namespace(ablation=None, overrides=[], questions=64, max_response=1024, seed=0))
    return run(args)


def simulate(args: argparse.Namespace) -> int:
    """Signal-yield simulator (docs/simulator.md): every strategy on the same simulated steps."""
    from axpo_rllm import simulator as sim

    try:
        cfg = sim.SimConfig(questions=args.questions, n=args.n, r=args.r, k=args.k, steps=args.steps, seed=args.seed)
    except ValueError as err:
        print(f"axpo-rllm simulate: {err}", file=sys.stderr)
        return 2
    report = sim.simulate(cfg)
    print(sim.format_calibration(report), end="\n\n")
    print(sim.format_table(report))
    points = []
    if args.sweep:
        base = sim.SimConfig(questions=args.questions, n=args.n, r=args.r, k=args.k,
                             steps=args.sweep_steps or args.steps, seed=args.seed)
        points = sim.sweep(base)
        print("\n" + sim.format_sweep(points))
    if args.png:
        print(f"\nwrote {sim.plot(report, args.png, points)}")
    return 0


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="signal-yield simulator: AXPO vs more rollouts and post-observation branching")
    p.add_argument("--questions", type=int, default=128, help="B, questions per step")
    p.add_argument("--n", type=int, default=8, help="N, rollouts per question")
    p.add_argument("--r", type=float, default=0.25, help="extra-sample ratio: E = floor(r·B·N)")
    p.add_argument("--k", type=int, default=4, help="K, continuations per selected prefix")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also vary r, K and N one at a time (a second table)")
    p.add_argument("--sweep-steps", type=int, default=0, help="steps per sweep point (default: --steps)")
    p.add_argument("--png", default="axpo-simulator.png", help="where to write the figure ('' for none)")
    p.set_defaults(func=simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axpo-rllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("plan-demo", help="plan + advantages on a synthetic step")
    demo.add_argument("--ablation", default=None)
    demo.add_argument("--questions", type=int, default=64)
    demo.add_argument("--max-response", type=int, default=1024)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. algorithm.axpo.r=0.5")
    demo.set_defaults(func=plan_demo)
    add_simulate_parser(sub)
    main_job = sub.add_parser("main", help="the embedded CPU job (tiny Qwen-VL, synthetic tasks)")
    main_job.add_argument("--smoke", action="store_true", help="every stage tiny (the end-to-end test)")
    main_job.add_argument("--ablation", default=None, help="grpo, no_prefix_fix, ... (configs/ablation)")
    main_job.add_argument("--steps", type=int, default=None, help="RL steps (rl.steps)")
    main_job.add_argument("--run-dir", default=None, help="parent folder of the run's outputs (default: runs)")
    main_job.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. sft.minutes=8 algorithm.axpo.r=0.5")
    main_job.set_defaults(func=run_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

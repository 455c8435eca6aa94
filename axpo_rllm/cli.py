"""Layer 7 — ``axpo-rllm``: the command line.

    axpo-rllm plan-demo [--ablation NAME] [key=value ...]   plan + advantages on one simulated step
    axpo-rllm simulate [--sweep] [--png PATH] [...]          signal-yield simulator: AXPO vs more rollouts / ARPO
    axpo-rllm main                                           the embedded CPU job
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def plan_demo(args: argparse.Namespace) -> int:
    """One simulated step (the simulator's seeded policy) through the core's phases, as a table."""
    from rich.console import Console  # imports of a subcommand wait until it runs (CLI start-up)
    from rich.table import Table

    from axpo_rllm.configs.loader import axpo_config, load_config
    from axpo_rllm.demo.simulator import demo_step

    cfg = load_config(args.ablation, args.overrides)
    outcome = demo_step(axpo_config(cfg), args.questions, int(cfg.actor_rollout_ref.rollout.n), seed=args.seed)
    group_size = len(outcome.groups[0].rollouts)
    table = Table(title=f"AXPO plan on a simulated step (B={len(outcome.groups)}, N={group_size}, ablation={args.ablation or 'none'})")
    table.add_column("diagnostic")
    table.add_column("value", justify="right")
    for key, value in outcome.diagnostics.items():
        table.add_row(key, f"{value:.4g}")
    table.add_row("training rows", str(len(outcome.rows)))
    Console().print(table)
    return 0


def run_main(args: argparse.Namespace) -> int:
    """The embedded CPU job (``axpo_rllm.demo.main_job``)."""
    from axpo_rllm.demo.main_job import run  # CLI start-up: torch/transformers load only for `main`

    return run(args)


def simulate(args: argparse.Namespace) -> int:
    """Signal-yield simulator (docs/simulator.md): every strategy on the same simulated steps."""
    from axpo_rllm.demo import simulator as sim  # CLI start-up

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
    demo = sub.add_parser("plan-demo", help="plan + advantages on one simulated step")
    demo.add_argument("--ablation", default=None)
    demo.add_argument("--questions", type=int, default=64)
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

"""The whole training step on the CPU trainer, AXPO vs GRPO: rollout + reference (and, with
``ppo_epochs > 1``, old) log-probs + update, side by side in one run.

    .venv/bin/python benchmarks/bench_train_step.py [--questions 8 --n 8 --k 4 --r 0.25 --repeats 3]

Measured 2026-12-05 (2-core VM, B=8, N=8, 4 repeats, medians): AXPO/GRPO whole step 1.20
(rollout 1.26, update 1.09); with ``--micro-batch-tokens 0 --no-trim`` (fixed 16-row micro-batches,
whole rows) the update was 1.52 / 1.85 s (GRPO / AXPO, 1.16) against 1.23 / 1.39 s.

The trainer of ``axpo-rllm main`` (``AXPOTrainer``): the tiny Qwen2.5-VL as actor, a
``TransformersEngine`` sampling with the actor's own weights, verl's ``compute_advantage`` /
``compute_policy_loss_vanilla`` / low-var KL, AdamW. The step has the paper's symptoms through the
seeded wrappers of ``tests/support`` (as ``bench_workflow.py``: ~30% tool use, answers right with
probability 0.3, log-normal turn lengths). Every arm of a repeat starts from the same weights and
optimizer state and samples the same phase 1. Reports the step's phases (rollout, update =
reference + policy forward/backward + optimizer) and the AXPO/GRPO ratios (target: whole step <= 1.10).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ARMS = {"grpo": dict(enable=False), "axpo": dict(), "axpo-barrier": dict(streaming="off")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--r", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default="grpo,axpo")
    parser.add_argument("--median-turn", type=float, default=24)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--max-tokens-per-turn", type=int, default=96)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="0: fixed --micro-batch rows per pass")
    parser.add_argument("--no-trim", action="store_true", help="forward whole rows (not only to the last loss token)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # test helpers (not shipped)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_workflow import make_tasks
    from symptom_world import LengthShapedEngine, SymptomGrader
    from tool_biased_engine import ToolBiasedEngine

    from axpo_rllm.agents.agent import AgentConfig, ChatFormat
    from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
    from axpo_rllm.configs.loader import axpo_config, load_config
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from axpo_rllm.engines.transformers_engine import TransformersEngine
    from axpo_rllm.envs.env import MultimodalToolEnv, build_tools
    from axpo_rllm.train.actor import Policy
    from axpo_rllm.train.trainer import AXPOTrainer, RLConfig, frozen_reference

    torch.manual_seed(0)
    engine = TransformersEngine(tiny_model_dir("qwen2_5_vl"))
    chat = ChatFormat(engine.tokenizer)
    policy = Policy(engine.model, engine.image_processor, engine.tokenizer.pad_token_id)
    reference = frozen_reference(policy)
    start_weights = copy.deepcopy(policy.model.state_dict())
    call = chat.encode('<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>')
    shaped = LengthShapedEngine(engine, median_tokens=args.median_turn, sigma=args.sigma)
    biased = ToolBiasedEngine(shaped, turn_start_ids=chat.encode("<|im_start|>assistant\n"), call_ids=call,
                              open_rate=0.0, call_rate=0.3, body_rate=0.5, score_inserted=False)
    tools = build_tools(["crop"])
    grader = SymptomGrader(0.3)
    agent = AgentConfig(max_tokens_per_turn=args.max_tokens_per_turn, max_response_tokens=512, max_context_tokens=2048)
    tasks = make_tasks(args.questions, 0)
    arms = args.arms.split(",")

    def step(arm: str, step_no: int) -> dict:
        policy.model.load_state_dict(start_weights)
        overrides = [f"algorithm.axpo.r={args.r}", f"algorithm.axpo.k={args.k}", f"actor_rollout_ref.rollout.n={args.n}"]
        overrides += [f"algorithm.axpo.{k}={v}" for k, v in ARMS[arm].items()]
        cfg = load_config(None, overrides)
        workflow = AXPOWorkflow(biased, chat, lambda: MultimodalToolEnv(tools=tools, grader=grader),
                                WorkflowConfig(n=args.n, axpo=axpo_config(cfg), agent=agent, seed=0))
        trainer = AXPOTrainer(policy, workflow, cfg, RLConfig(micro_batch_size=args.micro_batch, micro_batch_tokens=args.micro_batch_tokens,
                                                              trim_to_loss=not args.no_trim), reference=reference)
        m = trainer.step(tasks, step_no)
        return {"step_s": m["timing/step_s"], "rollout_s": m["timing/rollout_s"], "update_s": m["timing/update_s"],
                "rows": m["train/rows"], "loss_tokens": m["actor/loss_tokens"], "used": m.get("axpo/extra_samples_used", 0.0),
                "budget": m.get("axpo/budget", 0.0), "tool_use": m["axpo/tool_use_rate"], "all_wrong": m["axpo/all_wrong_rate"]}

    step("axpo", 0)  # warm-up
    rows = []
    for rep in range(args.repeats):
        row = {arm: step(arm, rep + 1) for arm in arms}
        rows.append(row)
        print(json.dumps(row, default=lambda v: round(v, 4)))
    med = lambda arm, key: statistics.median(r[arm][key] for r in rows)  # noqa: E731
    print(f"\nB={args.questions} N={args.n} K={args.k} r={args.r}; {args.repeats} repeats; torch threads {args.threads}; "
          f"micro-batches: {args.micro_batch_tokens or 'fixed'} tokens / {args.micro_batch} rows, trim to loss {not args.no_trim}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; medians:")
    print(f"  {'arm':13s} {'step s':>7s} {'rollout':>8s} {'update':>7s} {'rows':>5s} {'loss tok':>8s} {'used/E':>7s}   "
          f"{'step':>5s} {'rollout':>7s} {'update':>6s} (/GRPO)")
    for arm in arms:
        ratio = lambda key: statistics.median(r[arm][key] / r["grpo"][key] for r in rows)  # noqa: E731
        print(f"  {arm:13s} {med(arm, 'step_s'):7.2f} {med(arm, 'rollout_s'):8.2f} {med(arm, 'update_s'):7.2f} "
              f"{med(arm, 'rows'):5.0f} {med(arm, 'loss_tokens'):8.0f} {med(arm, 'used'):3.0f}/{med(arm, 'budget'):<3.0f}   "
              f"{ratio('step_s'):5.3f} {ratio('rollout_s'):7.3f} {ratio('update_s'):6.3f}")
    print(f"  symptoms: tool use {med('grpo', 'tool_use'):.3f}, all-wrong tool subgroups {med('grpo', 'all_wrong'):.3f}; "
          "target: whole step AXPO/GRPO <= 1.10")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "repeats": rows}, indent=2))
    engine.close()


if __name__ == "__main__":
    main()

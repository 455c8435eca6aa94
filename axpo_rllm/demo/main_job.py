"""The embedded CPU job: a tiny Qwen-VL built offline, synthetic visual tasks, SFT, then AXPO.

    axpo-rllm main [--smoke] [--ablation NAME] [--steps N] [key=value ...]

Stages, in order (nothing is downloaded; no GPU)::

    model   tiny Qwen2.5-VL built offline, its BPE retrained on rendered teacher conversations (cached)
    tasks   synthetic visual tasks (colour / position / size direct; code / search / crop via tools)
    tools   crop, sandboxed python, search against a local BM25 server over a made-up fact corpus
    SFT     teacher trajectories (~25% with a tool call); well-formed / tool-call rates before & after
    eval    Pass@1 / Pass@4 and tool-use rate on held-out tasks (after SFT)
    RL      AXPO (or GRPO / an ablation) steps: real engine, verl estimator + losses, JSONL metrics
    eval    the same held-out tasks after RL; a summary table

Config: ``configs/axpo.yaml`` (+ ``ablation/NAME.yaml``) + ``configs/main_cpu.yaml`` + ``--smoke``
(``configs/main_smoke.yaml``) + overrides, e.g. ``rl.steps=20 sft.minutes=8 algorithm.axpo.r=0.5``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.configs.loader import axpo_config, config_text, load_config
from axpo_rllm.core.config import dataclass_from_mapping
from axpo_rllm.demo.teacher import teacher_trajectories
from axpo_rllm.demo.tiny_model import cache_root, tiny_model_dir
from axpo_rllm.demo.world import SyntheticWorld
from axpo_rllm.engines.transformers_engine import TransformersEngine
from axpo_rllm.envs.env import MultimodalToolEnv, build_tools, run_sync
from axpo_rllm.envs.search_server import BM25Index, RetrievalServer
from axpo_rllm.train.actor import Policy
from axpo_rllm.train.evaluate import evaluate
from axpo_rllm.train.sft import SFTConfig, eval_loss, first_turn_stats, tokenize_trajectory, tokenizer_corpus, train_sft
from axpo_rllm.train.trainer import AXPOTrainer, rl_config_from

__all__ = ["job_config", "Runtime", "run", "COMPACT_SCHEMAS"]

SYSTEM_PROMPT = "You are a helpful assistant."

COMPACT_SCHEMAS: dict[str, tuple[str, dict]] = {
    "crop": ("Crop a box [x1, y1, x2, y2] (0-1000) of an image.",
             {"type": "object", "properties": {"image_index": {"type": "integer"}, "bbox": {"type": "array"}}, "required": ["bbox"]}),
    "python": ("Run python code; images is the list of images.",
               {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}),
    "search": ("Search the fact corpus.",
               {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
}
"""Short tool descriptions for the tiny model: the full ones are ~400 prompt tokens of 500."""


def job_config(
    ablation: str | None = None,
    overrides: Sequence[str] = (),
    smoke: bool = False,
    steps: int | None = None,
) -> DictConfig:
    """axpo.yaml (+ ablation) + main_cpu.yaml (+ main_smoke.yaml) + ``--steps`` + overrides, validated."""
    layers = [load_config(ablation), OmegaConf.create(config_text("main_cpu.yaml"))]
    if smoke:
        layers.append(OmegaConf.create(config_text("main_smoke.yaml")))
        base_n = int(layers[0].actor_rollout_ref.rollout.n)
        layers.append(OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": max(4, base_n // 2)}}}))
    if steps is not None:
        layers.append(OmegaConf.create({"rl": {"steps": int(steps)}}))
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.merge(*layers)
    OmegaConf.update(cfg, "job.ablation", ablation or "axpo", force_add=True)
    OmegaConf.update(cfg, "job.smoke", bool(smoke), force_add=True)
    axpo_config(cfg)
    return cfg


def _agent_config(cfg: DictConfig) -> AgentConfig:
    return dataclass_from_mapping(AgentConfig, OmegaConf.to_container(cfg.agent, resolve=True), "agent config",
                                  system_prompt=SYSTEM_PROMPT)


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


@dataclass
class Runtime:
    """Everything the stages share: tasks, tools (and the search server), the model and engine."""

    cfg: DictConfig
    log: Any = print
    world: Any = None
    server: Any = None
    tools: dict = field(default_factory=dict)
    model_dir: Path | None = None
    engine: Any = None
    chat: Any = None
    policy: Any = None

    def __enter__(self) -> "Runtime":
        cfg = self.cfg
        self.world = SyntheticWorld(seed=int(cfg.tasks.seed), n_facts=int(cfg.tasks.n_facts))
        self.server = RetrievalServer(BM25Index(self.world.corpus)).start()
        names = list(cfg.tools.names)
        configs = {"search": {"backend": "local", "base_url": self.server.url, "top_k": int(cfg.tools.search_top_k)}} if "search" in names else {}
        self.tools = build_tools(names, configs)
        if cfg.tools.compact_schemas:
            for name, tool in self.tools.items():
                if name in COMPACT_SCHEMAS:
                    tool.description, tool.parameters = COMPACT_SCHEMAS[name]  # instance attributes shadow the class's
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.close()
        for tool in self.tools.values():
            try:
                run_sync(tool.aclose())
            except Exception:  # noqa: BLE001 - teardown of one tool must not hide the job's outcome
                pass
        if self.server is not None:
            self.server.stop()

    # -- pieces ------------------------------------------------------------------------------------

    def env(self):
        return MultimodalToolEnv(tools=self.tools)

    @property
    def tool_schemas(self) -> list[dict]:
        return self.env().tool_schemas()

    def build_model(self) -> Path:
        """The tiny Qwen-VL whose tokenizer was trained on rendered teacher conversations (cached)."""
        family, seed = str(self.cfg.model.family), int(self.cfg.model.seed)
        base = tiny_model_dir(family, seed)
        chat0 = ChatFormat(AutoTokenizer.from_pretrained(base))
        tasks = self.world.tasks(int(self.cfg.model.tokenizer_conversations), "train")
        corpus = tokenizer_corpus(teacher_trajectories(tasks, self.env()), chat0, self.tool_schemas, SYSTEM_PROMPT)
        self.model_dir = tiny_model_dir(family, seed, corpus_texts=corpus)
        return self.model_dir

    def load(self, model_dir: Path) -> None:
        """Engine + policy on one shared module (the engine samples what the actor trains)."""
        if self.engine is not None:
            self.engine.close()
        self.engine = TransformersEngine(model_dir)
        self.chat = ChatFormat(self.engine.tokenizer)
        self.policy = Policy(self.engine.model, self.engine.image_processor, self.engine.tokenizer.pad_token_id)

    def first_turn_stats(self, tasks) -> dict[str, float]:
        env = self.env()
        return first_turn_stats(
            self.engine, self.chat, tasks, env.tool_schemas(), env.tool_names, SYSTEM_PROMPT,
            max_tokens=int(self.cfg.agent.max_tokens_per_turn), temperature=float(self.cfg.agent.temperature),
        )

    def evaluate(self, tasks) -> dict[str, float]:
        return evaluate(self.engine, self.chat, self.env, tasks, k=int(self.cfg.eval.k),
                        agent_config=_agent_config(self.cfg), seed=int(self.cfg.job.seed))


# ------------------------------------------------------------------------------------------------
# Stages


def stage_sft(rt: Runtime, log) -> dict[str, Any]:
    """SFT from the freshly built model, or the cached checkpoint of an identical earlier run."""
    cfg = rt.cfg
    node = OmegaConf.to_container(cfg.sft, resolve=True)
    probe_n = int(node.pop("probe_tasks"))
    sft_cfg = dataclass_from_mapping(SFTConfig, node, "sft config", seed=int(cfg.job.seed))
    probe = rt.world.tasks(probe_n, "eval")
    key = _digest(str(rt.model_dir), node, OmegaConf.to_container(cfg.tasks), OmegaConf.to_container(cfg.tools),
                  OmegaConf.to_container(cfg.agent), int(cfg.job.seed))
    cached = cache_root() / f"sft-{key}"
    if cfg.job.cache_sft and (cached / "sft_stats.json").exists():
        log(f"SFT: reusing the checkpoint of an identical run at {cached}")
        rt.load(cached)
        return json.loads((cached / "sft_stats.json").read_text()) | {"cached": True}

    rt.load(rt.model_dir)
    t0 = time.perf_counter()
    trajs = teacher_trajectories(rt.world.tasks(sft_cfg.examples, "train"), rt.env())
    examples = [tokenize_trajectory(t, rt.chat, rt.tool_schemas, SYSTEM_PROMPT) for t in trajs]
    held_out = [tokenize_trajectory(t, rt.chat, rt.tool_schemas, SYSTEM_PROMPT) for t in teacher_trajectories(probe, rt.env())]
    log(f"SFT: {len(examples)} teacher trajectories ({sum(e.uses_tool for e in examples) / len(examples):.0%} with a tool call) "
        f"in {time.perf_counter() - t0:.1f}s")
    before = rt.first_turn_stats(probe)
    loss_before = eval_loss(rt.policy, held_out)
    history = train_sft(rt.policy, examples, sft_cfg, log=lambda r: log(
        f"  sft step {r['step']:4d}  loss {r['loss']:.3f}  lr {r['lr']:.2e}  {r['elapsed_s']:.0f}s"))
    after = rt.first_turn_stats(probe)
    stats = {
        "teacher_tool_share": sum(e.uses_tool for e in examples) / len(examples),
        "examples": len(examples),
        "steps": len(history),
        "train_s": history[-1]["elapsed_s"] if history else 0.0,
        "loss_first": history[0]["loss"] if history else math.nan,
        "loss_last": history[-1]["loss"] if history else math.nan,
        "heldout_loss_before": loss_before,
        "heldout_loss_after": eval_loss(rt.policy, held_out),
        "before": before,
        "after": after,
        "cached": False,
    }
    if cfg.job.cache_sft:
        staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cache_root()))
        shutil.copytree(rt.model_dir, staging, dirs_exist_ok=True)
        rt.policy.model.save_pretrained(staging)
        (staging / "sft_stats.json").write_text(json.dumps(stats))
        try:
            os.rename(staging, cached)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return stats


def stage_rl(rt: Runtime, run_dir: Path, log) -> list[dict]:
    cfg = rt.cfg
    rl = rl_config_from(cfg.rl, log_path=str(run_dir / "metrics.jsonl"))
    wf_cfg = WorkflowConfig(
        n=int(cfg.actor_rollout_ref.rollout.n), axpo=axpo_config(cfg), agent=_agent_config(cfg), seed=int(cfg.job.seed)
    )
    workflow = AXPOWorkflow(rt.engine, rt.chat, rt.env, wf_cfg)
    trainer = AXPOTrainer(rt.policy, workflow, cfg, rl)
    rl_world = SyntheticWorld(seed=int(cfg.tasks.seed), n_facts=int(cfg.tasks.n_facts), mix=dict(cfg.tasks.rl_mix))
    pool = rl_world.tasks(max(rl.steps * rl.batch_questions, 1), "train")

    def stream(step: int):
        return pool[step * rl.batch_questions : (step + 1) * rl.batch_questions]

    def show(m: dict) -> None:
        log(
            f"  rl step {int(m['step']):3d}  reward {m['train/reward_mean']:.3f}  tool-use {m['axpo/tool_use_rate']:.2f}  "
            f"triggered {m['axpo/triggered_questions']:.0f}  prefixes {m['axpo/prefixes_selected']:.0f}  "
            f"recovery {m['axpo/recovery_rate']:.2f}  pg {m.get('actor/pg_loss', math.nan):+.4f}  "
            f"kl {m.get('actor/kl_loss', math.nan):.2e}  {m['timing/step_s']:.1f}s"
        )

    return trainer.fit(stream, log=show)


def _summary_table(summary: dict) -> Table:
    table = Table(title=f"AXPO embedded CPU job — ablation: {summary['ablation']}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")

    def fmt(x: Any) -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.3f}" if isinstance(x, float) else str(x))

    sft = summary["sft"]
    table.add_row("SFT well-formed first turns", fmt(sft.get("before", {}).get("well_formed")), fmt(sft.get("after", {}).get("well_formed")))
    table.add_row("SFT first-turn tool-call share", fmt(sft.get("before", {}).get("tool_call_share")), fmt(sft.get("after", {}).get("tool_call_share")))
    table.add_row("SFT held-out teacher loss", fmt(sft.get("heldout_loss_before")), fmt(sft.get("heldout_loss_after")))
    before, after = summary["eval_before"], summary["eval_after"]
    k = summary["k"]
    for key in ("eval/pass@1", f"eval/pass@{k}", "eval/tool_use_rate", "eval/acc_tool", "eval/acc_no_tool"):
        table.add_row(f"RL {key} (held-out)", fmt(before.get(key)), fmt(after.get(key)))
    fams = sorted({key.split("/")[1] for key in before if key.count("/") == 2})
    for fam in fams:
        table.add_row(f"  {fam} pass@1 / tool-use", f"{fmt(before.get(f'eval/{fam}/pass@1'))} / {fmt(before.get(f'eval/{fam}/tool_use_rate'))}",
                      f"{fmt(after.get(f'eval/{fam}/pass@1'))} / {fmt(after.get(f'eval/{fam}/tool_use_rate'))}")
    rl = summary["rl"]
    table.add_row("RL steps / mean step time (s)", "", f"{rl['steps']} / {fmt(rl['mean_step_s'])}")
    table.add_row("AXPO triggered / prefixes / recovery (sum, sum, mean)", "",
                  f"{fmt(rl['triggered'])} / {fmt(rl['prefixes'])} / {fmt(rl['recovery_mean'])}")
    return table


def run(args: argparse.Namespace) -> int:
    """``axpo-rllm main``: every stage, a summary table, ``runs/<name>/summary.json``."""
    console = Console()
    cfg = job_config(getattr(args, "ablation", None), getattr(args, "overrides", None) or (),
                     smoke=bool(getattr(args, "smoke", False)), steps=getattr(args, "steps", None))
    torch.set_num_threads(int(cfg.job.threads))
    torch.manual_seed(int(cfg.job.seed))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(getattr(args, "run_dir", None) or cfg.job.run_dir) / f"{stamp}-{cfg.job.ablation}{'-smoke' if cfg.job.smoke else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    started = time.perf_counter()

    def log(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {msg}")

    with Runtime(cfg) as rt:
        rt.build_model()
        log(f"model: {rt.model_dir}")
        sft = stage_sft(rt, log)
        log(f"SFT: well-formed {sft['before']['well_formed']:.2f} -> {sft['after']['well_formed']:.2f}, "
            f"tool calls {sft['before']['tool_call_share']:.2f} -> {sft['after']['tool_call_share']:.2f}")
        eval_tasks = rt.world.tasks(int(cfg.eval.tasks), "eval")
        t0 = time.perf_counter()
        eval_before = rt.evaluate(eval_tasks)
        log(f"eval before RL: pass@1 {eval_before['eval/pass@1']:.3f}  pass@{cfg.eval.k} {eval_before[f'eval/pass@{cfg.eval.k}']:.3f}  "
            f"tool-use {eval_before['eval/tool_use_rate']:.2f}  ({time.perf_counter() - t0:.0f}s)")
        history = stage_rl(rt, run_dir, log)
        eval_after = rt.evaluate(eval_tasks)
        log(f"eval after RL:  pass@1 {eval_after['eval/pass@1']:.3f}  pass@{cfg.eval.k} {eval_after[f'eval/pass@{cfg.eval.k}']:.3f}  "
            f"tool-use {eval_after['eval/tool_use_rate']:.2f}")

    def total(key: str) -> float:
        return float(sum(h.get(key, 0.0) for h in history if not math.isnan(h.get(key, 0.0))))

    recov = [h["axpo/recovery_rate"] for h in history if not math.isnan(h.get("axpo/recovery_rate", math.nan))]
    summary = {
        "ablation": str(cfg.job.ablation),
        "smoke": bool(cfg.job.smoke),
        "k": int(cfg.eval.k),
        "model_dir": str(rt.model_dir),
        "sft": sft,
        "eval_before": eval_before,
        "eval_after": eval_after,
        "rl": {
            "steps": len(history),
            "mean_step_s": float(sum(h["timing/step_s"] for h in history) / len(history)) if history else math.nan,
            "triggered": total("axpo/triggered_questions"),
            "prefixes": total("axpo/prefixes_selected"),
            "recovery_mean": float(sum(recov) / len(recov)) if recov else math.nan,
        },
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    console.print(_summary_table(summary))
    log(f"done: {run_dir}")
    return 0

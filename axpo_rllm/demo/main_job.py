"""The embedded CPU job: a tiny Qwen-VL built offline, synthetic visual tasks, SFT once, then RL arms.

    axpo-rllm main [--smoke] [--preset evidence] [--arms axpo,grpo,no_prefix_fix] [--seeds S] [--steps N]
                   [--resume RUN_DIR] [key=value ...]

Stages, in order (nothing is downloaded; no GPU)::

    model   tiny Qwen2.5-VL built offline, its BPE retrained on rendered teacher conversations (cached)
    tasks   the gap world (demo/gap_world.py): colour / position / size direct; code with four
            candidate calls, one right, or a direct guess (tasks.world=synthetic: the earlier world)
    tools   the job's tools.names: sandboxed python (+ crop, search against a local BM25 server)
    SFT     teacher trajectories (tool use a choice, call content varied); well-formed / tool-call rates
    eval    Pass@1 / Pass@4 and tool-use rate on held-out tasks (after SFT), once
    RL      every arm (axpo, grpo, no_prefix_fix, any ablation) x seed from the same SFT weights and seeds;
            per-step lines, metrics.jsonl, a checkpoint every job.checkpoint_every steps
    eval    the same held-out tasks after each arm; plots/curves.png, plots/eval.png, summary.json/.md

Run folder: ``job.json`` (the arguments, for ``--resume``), ``config.yaml``, ``sft/`` (the shared
checkpoint), ``eval_before.json``, ``arms/<arm>/config.yaml``, ``arms/<arm>/seed<i>/{metrics.jsonl,
checkpoint.pt (the latest), result.json}``, ``tensorboard/<arm>/seed<i>/`` (verl's Tracking:
``trainer.logger``), ``plots/``, ``summary.json``, ``summary.md`` (the full table; a compact one
is printed).

Config: ``configs/axpo.yaml`` (+ ``ablation/NAME.yaml`` per arm) + ``configs/main_cpu.yaml`` (+ ``--preset
evidence``: ``configs/main_evidence.yaml``, 3 seeds) + ``--smoke``
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
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoTokenizer

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.configs.loader import axpo_config, check_budget, check_source_tail, config_text, group_size, load_config
from axpo_rllm.core.config import dataclass_from_mapping
from axpo_rllm.demo.report import (
    LINE_WIDTH,
    closing_note,
    compact_table,
    measured_figures,
    plot_curves,
    plot_eval,
    step_header,
    step_line,
    verdict,
)
from axpo_rllm.demo.teacher import teacher_trajectories
from axpo_rllm.demo.tiny_model import cache_root, tiny_model_dir
from axpo_rllm.demo.gap_world import make_world
from axpo_rllm.demo.world import FAMILIES
from axpo_rllm.engines.transformers_engine import TransformersEngine
from axpo_rllm.envs.env import MultimodalToolEnv, build_tools, run_sync
from axpo_rllm.envs.search_server import BM25Index, RetrievalServer
from axpo_rllm.train.actor import Policy
from axpo_rllm.train.evaluate import evaluate
from axpo_rllm.train.sft import SFTConfig, eval_loss, first_turn_stats, tokenize_trajectory, tokenizer_corpus, train_sft
from axpo_rllm.train.tracking import StepTracker, eval_metrics, tracking_backends, train_metrics
from axpo_rllm.train.trainer import AXPOTrainer, rl_config_from

__all__ = ["job_config", "arm_config", "rl_pool", "stage_arm", "Runtime", "run", "COMPACT_SCHEMAS"]

SYSTEM_PROMPT = "You are a helpful assistant."

DATA_SOURCE = "synthetic"
"""The held-out eval's data source in tracked metric names (``val-core/synthetic/pass@1``)."""

COMPACT_SCHEMAS: dict[str, tuple[str, dict]] = {
    "crop": ("Crop a box [x1, y1, x2, y2] (0-1000) of an image.",
             {"type": "object", "properties": {"image_index": {"type": "integer"}, "bbox": {"type": "array"}}, "required": ["bbox"]}),
    "python": ("Run python code; images is the list of images.",
               {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}),
    "search": ("Search the fact corpus.",
               {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
}
"""Short tool descriptions for the tiny model: the full ones are ~400 prompt tokens of 500."""


PRESETS = ("evidence",)
"""``--preset NAME``: ``configs/main_NAME.yaml`` merged over main_cpu.yaml (before ``--smoke``)."""


def job_config(
    ablation: str | None = None,
    overrides: Sequence[str] = (),
    smoke: bool = False,
    steps: int | None = None,
    preset: str | None = None,
) -> DictConfig:
    """:func:`~axpo_rllm.configs.loader.load_config` with the job's files (``main_cpu.yaml``, +
    ``main_PRESET.yaml``, + ``main_smoke.yaml``), the smoke's halved N and ``--steps`` as settings,
    then the overrides."""
    layers = [OmegaConf.create(config_text("main_cpu.yaml"))]
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {preset!r}")
        layers.append(OmegaConf.create(config_text(f"main_{preset}.yaml")))
    settings = []
    if smoke:
        layers.append(OmegaConf.create(config_text("main_smoke.yaml")))
        base_n = int(load_config(ablation).actor_rollout_ref.rollout.n)
        settings.append({"actor_rollout_ref": {"rollout": {"n": max(4, base_n // 2)}}})
    if steps is not None:
        settings.append({"rl": {"steps": int(steps)}})
    cfg = load_config(ablation, overrides, layers=layers, settings=settings)
    OmegaConf.update(cfg, "job.ablation", ablation or "axpo", force_add=True)
    OmegaConf.update(cfg, "job.smoke", bool(smoke), force_add=True)
    return cfg


def world_of(cfg: DictConfig, **kwargs):
    """The job's task world (``tasks.world``: ``gap`` or the earlier ``synthetic``)."""
    asked = OmegaConf.select(cfg, "tasks.asked", default=None)
    if asked:  # the gap world's quadrants to ask about
        kwargs["asked"] = list(asked)
    return make_world(str(cfg.tasks.get("world", "synthetic")), seed=int(cfg.tasks.seed), n_facts=int(cfg.tasks.n_facts),
                      **kwargs)


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
    sft_world: Any = None
    server: Any = None
    tools: dict = field(default_factory=dict)
    model_dir: Path | None = None
    engine: Any = None
    chat: Any = None
    policy: Any = None

    def __enter__(self) -> "Runtime":
        cfg = self.cfg
        self.world = world_of(cfg)
        # SFT data (and the tokenizer's corpus) follow tasks.sft_mix when it is set
        sft_mix = OmegaConf.select(cfg, "tasks.sft_mix", default=None)
        self.sft_world = world_of(cfg, mix=dict(sft_mix)) if sft_mix else self.world
        self.server = RetrievalServer(BM25Index(self.world.corpus)).start()
        names = list(cfg.tools.names)
        configs = {"search": {"backend": "local", "base_url": self.server.url, "top_k": int(cfg.tools.search_top_k)}} if "search" in names else {}
        if "python" in names and OmegaConf.select(cfg, "tools.python") is not None:
            configs["python"] = OmegaConf.to_container(cfg.tools.python)  # the sandbox's floor for this job
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
        tasks = self.sft_world.tasks(int(self.cfg.model.tokenizer_conversations), "train")
        corpus = tokenizer_corpus(self.teacher(tasks), chat0, self.tool_schemas, SYSTEM_PROMPT)
        self.model_dir = tiny_model_dir(family, seed, corpus_texts=corpus)
        return self.model_dir

    @property
    def direct_share(self) -> float:
        return float(self.cfg.tasks.get("teacher_direct_share", 0.0))

    def teacher(self, tasks) -> list:
        """Teacher trajectories of ``tasks`` with the job's ``tasks.teacher_*`` shares."""
        return teacher_trajectories(tasks, self.env(), self.direct_share,
                                    float(self.cfg.tasks.get("teacher_right_call_share", 1.0)))

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

    def evaluate(self, tasks, progress: bool = False) -> dict[str, float]:
        return evaluate(self.engine, self.chat, self.env, tasks, k=int(self.cfg.eval.k),
                        agent_config=_agent_config(self.cfg), seed=int(self.cfg.job.seed), progress=progress)


# ------------------------------------------------------------------------------------------------
# Stages


def stage_sft(rt: Runtime, log, console: Console | None = None) -> dict[str, Any]:
    """SFT from the freshly built model, or the cached checkpoint of an identical earlier run."""
    cfg = rt.cfg
    node = OmegaConf.to_container(cfg.sft, resolve=True)
    probe_n = int(node.pop("probe_tasks"))
    sft_cfg = dataclass_from_mapping(SFTConfig, node, "sft config", seed=int(cfg.job.seed))
    probe = rt.world.tasks(probe_n, "eval", families=eval_families(cfg))
    key = _digest(str(rt.model_dir), node, OmegaConf.to_container(cfg.tasks), OmegaConf.to_container(cfg.tools),
                  OmegaConf.to_container(cfg.agent), int(cfg.job.seed))
    cached = cache_root() / f"sft-{key}"
    if cfg.job.cache_sft and (cached / "sft_stats.json").exists():
        log(f"SFT: reusing the checkpoint of an identical run at {_shown(cached)}")
        rt.load(cached)
        return json.loads((cached / "sft_stats.json").read_text()) | {"cached": True}

    rt.load(rt.model_dir)
    t0 = time.perf_counter()
    trajs = rt.teacher(rt.sft_world.tasks(sft_cfg.examples, "train"))
    examples = [tokenize_trajectory(t, rt.chat, rt.tool_schemas, SYSTEM_PROMPT) for t in trajs]
    held_out = [tokenize_trajectory(t, rt.chat, rt.tool_schemas, SYSTEM_PROMPT) for t in rt.teacher(probe)]
    log(f"SFT: {len(examples)} teacher trajectories ({sum(e.uses_tool for e in examples) / len(examples):.0%} with a tool call) "
        f"in {time.perf_counter() - t0:.1f}s")
    before = rt.first_turn_stats(probe)
    loss_before = eval_loss(rt.policy, held_out)
    with Progress(TextColumn("SFT"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=console is None) as progress:
        bar = progress.add_task("sft", total=60 * sft_cfg.minutes, info="")

        def on_record(r: dict) -> None:
            progress.update(bar, completed=min(r["elapsed_s"], 60 * sft_cfg.minutes), info=f"step {r['step']} loss {r['loss']:.3f}")
            log(f"  sft step {r['step']:4d}  loss {r['loss']:.3f}  lr {r['lr']:.2e}  {r['elapsed_s']:.0f}s")

        history = train_sft(rt.policy, examples, sft_cfg, log=on_record)
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


def arm_config(arm: str, overrides: Sequence[str] = (), smoke: bool = False, steps: int | None = None,
               preset: str | None = None) -> DictConfig:
    """An arm's config: ``axpo`` (the defaults) or any ``configs/ablation`` name (``grpo``, ...),
    refused here (before any stage runs) when the CPU job could not train it."""
    cfg = job_config(None if arm == "axpo" else arm, overrides, smoke=smoke, steps=steps, preset=preset)
    check_arm_config(cfg)
    return cfg


def check_arm_config(cfg: DictConfig) -> None:
    """What the CPU job checks up front: the batch (verl's, one advantage per row) cannot carry
    ``source_tail: keep``, and the AXPO budget must buy at least one prefix."""
    check_source_tail(cfg, "the CPU job (verl's batch: one advantage per row)")
    check_budget(cfg, int(cfg.rl.batch_questions), "rl.batch_questions")


def eval_tasks_of(world, cfg: DictConfig) -> list:
    """The held-out questions: ``eval.tasks`` of the eval split, the families of ``eval.families``
    in turn (every family when it is unset; a family listed twice gets twice the questions)."""
    return world.tasks(int(cfg.eval.tasks), "eval", families=eval_families(cfg))


def eval_families(cfg: DictConfig) -> list[str]:
    """``eval.families`` (the held-out questions' families, in turn), or every family."""
    families = OmegaConf.select(cfg, "eval.families", default=None)
    return list(families) if families else list(FAMILIES)


def rl_pool(cfg: DictConfig, seed_index: int) -> list:
    """The RL questions of seed ``seed_index``: the same for every arm, disjoint across seeds, train split only."""
    rl = rl_config_from(cfg.rl)
    world = world_of(cfg, mix=dict(cfg.tasks.rl_mix))
    per_seed = max(rl.steps * rl.batch_questions, 1)
    return world.tasks(per_seed * (seed_index + 1), "train")[per_seed * seed_index :]


def stage_arm(rt: Runtime, acfg: DictConfig, arm_dir: Path, seed_index: int, log, progress=None,
              tracker: StepTracker | None = None) -> list[dict]:
    """One RL arm from the current (SFT) weights: checkpoints every ``job.checkpoint_every`` steps,
    resumed from ``arm_dir/checkpoint.pt`` when it exists; each step's metrics go to ``tracker``
    (verl's Tracking) at step i+1, as verl numbers its global steps."""
    seed = int(acfg.job.seed) + seed_index
    metrics_path = arm_dir / "metrics.jsonl"
    rl = rl_config_from(acfg.rl, log_path=str(metrics_path))
    torch.manual_seed(seed)
    wf_cfg = WorkflowConfig(n=group_size(acfg), axpo=axpo_config(acfg), agent=_agent_config(acfg), seed=seed)
    workflow = AXPOWorkflow(rt.engine, rt.chat, rt.env, wf_cfg)
    trainer = AXPOTrainer(rt.policy, workflow, acfg, rl)
    ckpt = arm_dir / "checkpoint.pt"
    start = 0
    if ckpt.exists():
        start = trainer.load_checkpoint(ckpt)
        lines = metrics_path.read_text().splitlines()[:start] if metrics_path.exists() else []
        metrics_path.write_text("".join(line + "\n" for line in lines))  # steps after the checkpoint run again
        log(f"{arm_dir.parent.name} seed {seed_index}: resumed from {_shown(ckpt)} at step {start + 1}/{rl.steps}")
    elif metrics_path.exists():
        metrics_path.unlink()
    pool = rl_pool(acfg, seed_index)
    every = int(acfg.job.get("checkpoint_every", 0))
    bar = progress.add_task(f"RL {arm_dir.parent.name} seed {seed_index}", total=rl.steps, completed=start) if progress is not None else None

    def stream(step: int):
        return pool[step * rl.batch_questions : (step + 1) * rl.batch_questions]

    log(step_header())

    def on_step(step: int, m: dict) -> None:
        log(step_line(m, arm_dir.parent.name, seed_index, rl.steps))
        if tracker is not None:
            tracker.log(train_metrics(m), step + 1)
        if every > 0 and ((step + 1) % every == 0 or step + 1 == rl.steps):
            trainer.save_checkpoint(ckpt, step)
        if bar is not None:
            progress.advance(bar)

    return trainer.fit(stream, start_step=start, on_step=on_step)


def _shown(path: str | Path) -> str:
    """A path as the user typed it: relative to the working directory when under it (short lines)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _tracker(cfg: DictConfig, backends: list[str], run_dir: Path, arm: str, seed_index: int,
             acfg: DictConfig) -> StepTracker:
    """verl's Tracking for one arm x seed: event files in ``<run>/tensorboard/<arm>/seed<i>``."""
    name = OmegaConf.select(cfg, "trainer.experiment_name", default=None) or run_dir.name
    return StepTracker(backends, str(OmegaConf.select(cfg, "trainer.project_name", default="axpo-rllm")),
                       f"{name}/{arm}/seed{seed_index}", run_dir / "tensorboard" / arm / f"seed{seed_index}",
                       file_path=run_dir / "arms" / arm / f"seed{seed_index}" / "tracking.jsonl",
                       config=OmegaConf.to_container(acfg, resolve=True))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run(args: argparse.Namespace) -> int:
    """``axpo-rllm main``: SFT once, then every arm × seed from the same checkpoint; plots, summary.

    ``--resume DIR`` continues the run in ``DIR`` with its own recorded arguments: the SFT
    checkpoint and the before-RL eval are reused, finished arms are read back, an arm with a
    checkpoint continues from it.
    """
    console = Console()
    resume = getattr(args, "resume", None)
    if resume:
        run_dir = Path(resume)
        job = json.loads((run_dir / "job.json").read_text())
    else:
        arms = getattr(args, "arms", None)
        ablation = getattr(args, "ablation", None)
        job = {
            "arms": [a.strip() for a in arms.split(",") if a.strip()] if arms else ([ablation] if ablation else None),
            "seeds": getattr(args, "seeds", None),
            "overrides": list(getattr(args, "overrides", None) or ()),
            "smoke": bool(getattr(args, "smoke", False)),
            "steps": getattr(args, "steps", None),
            "preset": getattr(args, "preset", None),
        }
    preset = job.get("preset")
    cfg = job_config(None, job["overrides"], smoke=job["smoke"], steps=job["steps"], preset=preset)
    arms = job["arms"] or list(cfg.job.arms)
    seeds = int(job["seeds"] or cfg.job.seeds)
    arm_cfgs = {arm: arm_config(arm, job["overrides"], smoke=job["smoke"], steps=job["steps"], preset=preset)
                for arm in arms}
    backends, tracking_notes = tracking_backends(OmegaConf.select(cfg, "trainer.logger", default=None))
    torch.set_num_threads(int(cfg.job.threads))
    torch.manual_seed(int(cfg.job.seed))
    if not resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = "-".join(arms) if len(arms) <= 3 else f"{len(arms)}arms"
        tag = f"-{preset}" if preset else ""
        run_dir = Path(getattr(args, "run_dir", None) or cfg.job.run_dir) / f"{stamp}-{name}{tag}{'-smoke' if cfg.job.smoke else ''}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.json").write_text(json.dumps({**job, "arms": arms, "seeds": seeds}, indent=2))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    for arm, acfg in arm_cfgs.items():
        (run_dir / "arms" / arm).mkdir(parents=True, exist_ok=True)
        (run_dir / "arms" / arm / "config.yaml").write_text(OmegaConf.to_yaml(acfg))
    started = time.perf_counter()
    steps = int(cfg.rl.steps)

    def log(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {msg}")

    for note in tracking_notes:
        log(note)
    if backends:
        where = f" -> {_shown(run_dir / 'tensorboard')}" if "tensorboard" in backends else ""
        log(f"tracking (verl): {', '.join(backends)}{where}")
    histories: dict[str, list[list[dict]]] = {arm: [] for arm in arms}
    evals: dict[str, list[dict]] = {arm: [] for arm in arms}
    with Runtime(cfg) as rt:
        rt.build_model()
        log(f"model: {_shown(rt.model_dir)}")
        if "python" in rt.tools:
            log(rt.tools["python"].describe_isolation())
        sft_dir = run_dir / "sft"
        if (sft_dir / "sft_stats.json").exists():
            rt.load(sft_dir)
            sft = json.loads((sft_dir / "sft_stats.json").read_text())
            log(f"SFT: resumed from {_shown(sft_dir)}")
        else:
            sft = stage_sft(rt, log, console)
            staging = run_dir / "sft.tmp"
            shutil.copytree(rt.model_dir, staging, dirs_exist_ok=True)
            rt.policy.model.save_pretrained(staging)
            (staging / "sft_stats.json").write_text(json.dumps(sft, default=float))
            os.replace(staging, sft_dir)
        log(f"SFT: well-formed {sft['before']['well_formed']:.2f} -> {sft['after']['well_formed']:.2f}, "
            f"tool calls {sft['before']['tool_call_share']:.2f} -> {sft['after']['tool_call_share']:.2f}")
        sft_state = {k: v.detach().clone() for k, v in rt.policy.model.state_dict().items()}
        eval_tasks = eval_tasks_of(rt.world, cfg)
        before_path = run_dir / "eval_before.json"
        if before_path.exists():
            eval_before = json.loads(before_path.read_text())
        else:
            t0 = time.perf_counter()
            eval_before = rt.evaluate(eval_tasks, progress=True)
            before_path.write_text(json.dumps(eval_before))
            log(f"eval before RL: pass@1 {eval_before['eval/pass@1']:.3f}  pass@{cfg.eval.k} {eval_before[f'eval/pass@{cfg.eval.k}']:.3f}  "
                f"tool-use {eval_before['eval/tool_use_rate']:.2f}  ({time.perf_counter() - t0:.0f}s)")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            for seed_index in range(seeds):
                for arm in arms:
                    arm_dir = run_dir / "arms" / arm / f"seed{seed_index}"
                    arm_dir.mkdir(parents=True, exist_ok=True)
                    done = arm_dir / "result.json"
                    if done.exists():
                        histories[arm].append(_read_jsonl(arm_dir / "metrics.jsonl"))
                        evals[arm].append(json.loads(done.read_text())["eval_after"])
                        log(f"{arm} seed {seed_index}: finished earlier, read back")
                        continue
                    rt.policy.model.load_state_dict(sft_state)  # every arm starts from the same SFT weights
                    with _tracker(cfg, backends, run_dir, arm, seed_index, arm_cfgs[arm]) as tracker:
                        tracker.log(eval_metrics(eval_before, DATA_SOURCE), 0)  # verl: validation before training
                        t0 = time.perf_counter()
                        stage_arm(rt, arm_cfgs[arm], arm_dir, seed_index, log, progress, tracker)
                        rl_s = time.perf_counter() - t0
                        eval_after = rt.evaluate(eval_tasks)
                        tracker.log(eval_metrics(eval_after, DATA_SOURCE), int(arm_cfgs[arm].rl.steps))
                    log(f"{arm} seed {seed_index}: eval after RL pass@1 {eval_after['eval/pass@1']:.3f}  "
                        f"pass@{cfg.eval.k} {eval_after[f'eval/pass@{cfg.eval.k}']:.3f}  tool-use {eval_after['eval/tool_use_rate']:.2f}  "
                        f"(RL {rl_s:.0f}s)")
                    done.write_text(json.dumps({"eval_after": eval_after, "rl_s": rl_s}))
                    histories[arm].append(_read_jsonl(arm_dir / "metrics.jsonl"))
                    evals[arm].append(eval_after)

    k = int(cfg.eval.k)
    figures = measured_figures(histories, evals, k)
    plots: dict[str, str] = {}
    try:
        plots["curves"] = str(plot_curves(histories, run_dir / "plots" / "curves.png",
                                          title=f"{' vs '.join(arms)}: {steps} RL steps, {seeds} seed(s), from one SFT checkpoint"))
        plots["eval"] = str(plot_eval(eval_before, evals, k, run_dir / "plots" / "eval.png"))
    except ImportError as e:  # matplotlib is optional (the `plot` extra)
        log(f"no plots: {e}")
    note = closing_note(figures, eval_before, k)
    summary = {
        "arms": arms,
        "seeds": seeds,
        "steps": steps,
        "smoke": bool(cfg.job.smoke),
        "k": k,
        "model_dir": str(rt.model_dir),
        "sft": sft,
        "eval_before": eval_before,
        "eval_after": evals,
        "figures": figures,
        "plots": plots,
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (run_dir / "summary.md").write_text(note)
    console.print(f"{', '.join(arms)} × {seeds} seed(s), {steps} RL steps (means over seeds):", highlight=False)
    for line in compact_table(figures, eval_before, k):
        console.print(line, highlight=False)
    reading = verdict(figures)
    if reading:
        console.print(textwrap.fill(reading, LINE_WIDTH), highlight=False)
    log(f"done: {_shown(run_dir)} (the full table with spreads: summary.md)")
    return 0

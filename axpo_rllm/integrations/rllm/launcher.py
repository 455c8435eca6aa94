"""GPU launcher: AXPO as an rllm training run (``AgentTrainer(backend="verl")``).

    python -m axpo_rllm.integrations.rllm.launcher [--ablation NAME] [--print-config] [key=value ...]

e.g. ``python -m axpo_rllm.integrations.rllm.launcher actor_rollout_ref.model.path=Qwen/Qwen3-VL-4B-Thinking
data.train_files=... trainer.n_gpus_per_node=8``. GRPO and every ablation of the paper are the
same run under ``--ablation`` (``configs/ablation/*.yaml``): one pipeline, config switches.

Thin on purpose (STYLE: adapters at the edge). It composes rllm's own hydra config
(``pkg://rllm.trainer.config`` / ``unified``), lays ``configs/axpo.yaml`` (+ the ablation) over
it — ``algorithm.adv_estimator=axpo``, ``algorithm.axpo.*``, the asymmetric clip, the low-var KL
to the reference — then the command-line overrides, and hands the result to rllm's
``AgentTrainer`` with our workflow class, AXPO's grouping hook and the per-role estimator map
(rllm computes advantages itself: ``axpo`` is registered with rllm's estimator registry when
``axpo_rllm.integrations.rllm.workflow`` is imported, in every worker that runs the workflow).

N lives in the workflow: one rllm run is one question, the workflow draws its N rollouts and its
continuations and meets the other questions of the step at a barrier, so ``rllm.rollout.n`` is
pinned to 1 and ``rllm.workflow.n_parallel_tasks`` to at least the questions per step. rllm is imported only here and only when the
run starts: without it the launcher fails with an error that says how to install it, and
:func:`launch_config` still builds (and tests) the AXPO part of the config.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.workflow import WorkflowConfig
from axpo_rllm.configs.loader import axpo_config, load_config
from axpo_rllm.core.config import dataclass_from_mapping
from axpo_rllm.envs.env import MultimodalToolEnv

__all__ = ["DEFAULT_WORKFLOW", "RllmMissing", "launch_config", "resolve_workflow", "main"]

DEFAULT_WORKFLOW = "axpo_rllm.integrations.rllm.workflow:AXPORllmWorkflow"
"""The rllm ``Workflow`` running AXPO's phases inside rllm (override: ``axpo_launch.workflow_class``)."""

RLLM_CONFIG_MODULE = "rllm.trainer.config"
RLLM_CONFIG_NAME = "unified"

INSTALL_HINT = (
    "rllm is not installed. rllm is not on the package registry: install it from its repository, "
    "e.g. `pip install 'rllm[verl] @ git+https://github.com/rllm-org/rllm'` (beside `pip install -e '.[train]'`)"
)


class RllmMissing(ImportError):
    """rllm (or its verl backend) cannot be imported; the message says how to install it."""


def launch_config(
    ablation: str | None = None,
    overrides: Sequence[str] = (),
    base: DictConfig | dict | None = None,
) -> DictConfig:
    """rllm's base config (``base``; empty when None) + axpo.yaml (+ ablation) + launcher keys + overrides.

    The AXPO layer is validated (``axpo_config``) so a typo in ``algorithm.axpo.*`` fails before
    any GPU is touched.
    """
    axpo = load_config(ablation)
    launcher = OmegaConf.create(
        {
            "axpo_launch": {
                "ablation": ablation or "axpo",
                "workflow_class": DEFAULT_WORKFLOW,
                "backend": "verl",
                "tools": ["crop", "python", "search"],
            },
        }
    )
    base_cfg = OmegaConf.create(base or {})
    OmegaConf.set_struct(base_cfg, False)  # rllm's hydra config is struct: AXPO adds its own keys
    cfg = OmegaConf.merge(base_cfg, axpo, launcher, OmegaConf.from_dotlist(list(overrides)))
    given = {o.split("=", 1)[0] for o in overrides}
    if "rllm.rollout.n" in given:
        raise ValueError(
            "set N with actor_rollout_ref.rollout.n: the AXPO workflow draws the N rollouts of a question "
            "itself, so rllm.rollout.n stays 1"
        )
    questions = int(OmegaConf.select(cfg, "data.train_batch_size", default=1) or 1)
    parallel = int(OmegaConf.select(cfg, "rllm.workflow.n_parallel_tasks", default=0) or 0)
    cfg = OmegaConf.merge(cfg, {"rllm": {"rollout": {"n": 1}, "workflow": {"n_parallel_tasks": max(parallel, questions)}}})
    if cfg.algorithm.adv_estimator != "axpo":
        raise ValueError(f"algorithm.adv_estimator must stay 'axpo' (GRPO is --ablation grpo), got {cfg.algorithm.adv_estimator!r}")
    axpo_config(cfg)
    return cfg


def _import_rllm() -> Any:
    try:
        from rllm.trainer.unified_trainer import AgentTrainer  # type: ignore[import-not-found]  # optional: rllm
    except ImportError as exc:
        raise RllmMissing(f"{INSTALL_HINT} ({exc})") from exc
    return AgentTrainer


def compose_rllm_base(overrides: Sequence[str] = ()) -> DictConfig:
    """rllm's own hydra config (needs rllm)."""
    _import_rllm()
    from hydra import compose, initialize_config_module  # only to compose rllm's own config

    with initialize_config_module(config_module=RLLM_CONFIG_MODULE, version_base=None):
        return compose(config_name=RLLM_CONFIG_NAME, overrides=list(overrides))


def resolve_workflow(path: str) -> type:
    """``module:Class`` -> the class, or an ImportError naming what is missing."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"workflow_class must look like 'package.module:Class', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"workflow module {module_name!r} cannot be imported: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"workflow module {module_name!r} has no {attr!r}") from None


def workflow_config(cfg: DictConfig):
    """The workflow's settings from the launch config: N, AXPO's switches, the agent's turn cap."""
    agent = OmegaConf.to_container(cfg.agent, resolve=True) if "agent" in cfg else {}
    return WorkflowConfig(n=int(cfg.actor_rollout_ref.rollout.n), axpo=axpo_config(cfg),
                          agent=dataclass_from_mapping(AgentConfig, agent, "agent config"))


def workflow_args(cfg: DictConfig) -> dict:
    """What ``AXPORllmWorkflow`` needs: the shared step coordinator, the model's processor, a fresh
    tool env per episode, and the workflow config (needs the model path and transformers)."""
    from verl.utils.tokenizer import hf_processor  # heavy; verl's loader binds the model's get_rope_index

    from axpo_rllm.integrations.rllm.workflow import AXPOStepCoordinator  # needs rllm (--print-config does not)
    from axpo_rllm.integrations.verl.batch import VisionProcessing  # needs verl

    config = workflow_config(cfg)
    processor = hf_processor(str(cfg.actor_rollout_ref.model.path))
    if processor is None or not hasattr(processor, "get_rope_index"):
        raise ValueError(f"actor_rollout_ref.model.path={cfg.actor_rollout_ref.model.path!r} has no Qwen-VL processor "
                         "(expected a Qwen2.5-VL / Qwen3-VL checkpoint)")
    tokenizer = processor.tokenizer
    vision = VisionProcessing(processor.image_processor, processor.get_rope_index,
                              int(tokenizer.convert_tokens_to_ids("<|image_pad|>")),
                              int(tokenizer.convert_tokens_to_ids("<|video_pad|>")))
    return {
        "coordinator": AXPOStepCoordinator(int(cfg.data.train_batch_size), config.axpo, group_size=config.n),
        "chat": processor,
        "env_factory": functools.partial(MultimodalToolEnv, tools=list(cfg.axpo_launch.tools)),
        "config": config,
        "vision": vision,
    }


def load_datasets(cfg: DictConfig):
    """(train, val) rllm datasets: registered names (``data.train_dataset`` / ``data.val_dataset``
    with ``data.*_split``) through rllm's ``DatasetRegistry``."""
    from rllm.data.dataset import DatasetRegistry  # type: ignore[import-not-found]  # needs rllm

    data = cfg.get("data", {}) or {}
    name = data.get("train_dataset")
    if not name:
        raise ValueError("set data.train_dataset (a name registered with rllm's DatasetRegistry) and optionally data.val_dataset")
    train = DatasetRegistry.load_dataset(name, data.get("train_split", "train"))
    val_name = data.get("val_dataset")
    val = DatasetRegistry.load_dataset(val_name, data.get("val_split", "test")) if val_name else None
    return train, val


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axpo_rllm.integrations.rllm.launcher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", default=None)
    parser.add_argument("--print-config", action="store_true", help="print the AXPO layer of the config and exit (no rllm needed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.print_config:
        print(OmegaConf.to_yaml(launch_config(args.ablation, args.overrides)))
        return 0
    try:
        AgentTrainer = _import_rllm()
    except RllmMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = compose_rllm_base()
    cfg = launch_config(args.ablation, args.overrides, base=base)
    workflow_class = resolve_workflow(str(cfg.axpo_launch.workflow_class))
    from axpo_rllm.integrations.rllm.workflow import AXPO_ROLE, axpo_traj_grouping_hook  # needs rllm

    train, val = load_datasets(cfg)
    trainer = AgentTrainer(
        workflow_class=workflow_class,
        workflow_args=workflow_args(cfg),
        config=cfg,
        train_dataset=train,
        val_dataset=val,
        backend=str(cfg.axpo_launch.backend),
        traj_grouping_hook=axpo_traj_grouping_hook,
        traj_group_adv_estimator_map={AXPO_ROLE: "axpo"},
    )
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

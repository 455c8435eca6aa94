"""GPU launcher: AXPO as an rllm training run (``AgentTrainer(backend="verl")``).

    python -m axpo_rllm.rllm_train [--ablation NAME] [--print-config] [key=value ...]

e.g. ``python -m axpo_rllm.rllm_train actor_rollout_ref.model.path=Qwen/Qwen3-VL-4B-Thinking
data.train_files=... trainer.n_gpus_per_node=8``. GRPO and every ablation of the paper are the
same run under ``--ablation`` (``configs/ablation/*.yaml``): one pipeline, config switches.

Thin on purpose (STYLE: adapters at the edge). It composes rllm's own hydra config
(``pkg://rllm.experimental.config`` / ``unified``), lays ``configs/axpo.yaml`` (+ the ablation) over
it — ``algorithm.adv_estimator=axpo`` (the estimator this package registers through verl's
``verl.plugins`` entry point), ``algorithm.axpo.*``, the asymmetric clip, the low-var KL to the
reference, ``rollout.n`` mirrored into ``rllm.rollout.n`` — then the command-line overrides, and
hands the result to rllm with our workflow class. rllm is imported only here and only when the
run starts: without it the launcher fails with an error that says how to install it, and
:func:`launch_config` still builds (and tests) the AXPO part of the config.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = ["DEFAULT_WORKFLOW", "RllmMissing", "launch_config", "resolve_workflow", "main"]

DEFAULT_WORKFLOW = "axpo_rllm.agents.rllm_workflow:AXPORllmWorkflow"
"""The rllm ``Workflow`` running AXPO's phases inside rllm (override: ``axpo_launch.workflow_class``)."""

RLLM_CONFIG_MODULE = "rllm.experimental.config"
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
    from axpo_rllm.config import axpo_config, load_config

    axpo = load_config(ablation)
    n = int(axpo.actor_rollout_ref.rollout.n)
    launcher = OmegaConf.create(
        {
            "rllm": {"rollout": {"n": n}},
            "axpo_launch": {
                "ablation": ablation or "axpo",
                "workflow_class": DEFAULT_WORKFLOW,
                "backend": "verl",
            },
        }
    )
    cfg = OmegaConf.merge(OmegaConf.create(base or {}), axpo, launcher, OmegaConf.from_dotlist(list(overrides)))
    # One N for both frameworks: an override of either key wins and is mirrored into the other.
    given = {o.split("=", 1)[0] for o in overrides}
    if "rllm.rollout.n" in given and "actor_rollout_ref.rollout.n" not in given:
        cfg.actor_rollout_ref.rollout.n = cfg.rllm.rollout.n
    cfg.rllm.rollout.n = cfg.actor_rollout_ref.rollout.n
    if cfg.algorithm.adv_estimator != "axpo":
        raise ValueError(f"algorithm.adv_estimator must stay 'axpo' (GRPO is --ablation grpo), got {cfg.algorithm.adv_estimator!r}")
    axpo_config(cfg)
    return cfg


def _import_rllm() -> Any:
    try:
        from rllm.experimental.unified_trainer import AgentTrainer  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RllmMissing(f"{INSTALL_HINT} ({exc})") from exc
    return AgentTrainer


def compose_rllm_base(overrides: Sequence[str] = ()) -> DictConfig:
    """rllm's own hydra config (needs rllm)."""
    _import_rllm()
    from hydra import compose, initialize_config_module

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


def load_datasets(cfg: DictConfig):
    """(train, val) rllm datasets: registered names (``data.train_dataset`` / ``data.val_dataset``
    with ``data.*_split``) through rllm's ``DatasetRegistry``."""
    from rllm.data.dataset import DatasetRegistry  # type: ignore[import-not-found]

    data = cfg.get("data", {}) or {}
    name = data.get("train_dataset")
    if not name:
        raise ValueError("set data.train_dataset (a name registered with rllm's DatasetRegistry) and optionally data.val_dataset")
    train = DatasetRegistry.load_dataset(name, data.get("train_split", "train"))
    val_name = data.get("val_dataset")
    val = DatasetRegistry.load_dataset(val_name, data.get("val_split", "test")) if val_name else None
    return train, val


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axpo_rllm.rllm_train", description=__doc__,
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
    train, val = load_datasets(cfg)
    trainer = AgentTrainer(
        workflow_class=workflow_class,
        workflow_args={"config": OmegaConf.to_container(cfg, resolve=True)},
        config=cfg,
        train_dataset=train,
        val_dataset=val,
        backend=str(cfg.axpo_launch.backend),
    )
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

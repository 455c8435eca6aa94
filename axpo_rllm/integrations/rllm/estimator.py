"""The ``axpo`` advantage estimator in rllm's registry (registered when this module is imported).

Select it with the per-role map ``algorithm.estimator_map = {"axpo": "axpo"}`` (a global
``adv_estimator: axpo`` falls back to an enum and fails). The grouping hook
(:mod:`axpo_rllm.integrations.rllm.trajectories`) has already made the groups AXPO's and stored
the core's advantage on each trajectory; the estimator hands those back.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from rllm.trainer.algorithms.advantage import register_rllm_adv_estimator
from rllm.types import TrajectoryGroup

from axpo_rllm.core.advantages import group_normalize
from axpo_rllm.core.config import AXPOConfig, std_normalization

__all__ = ["AXPO_ROLE", "AXPO_ESTIMATOR", "axpo_advantages"]

AXPO_ROLE = "axpo"
"""The group role of every AXPO trajectory group (``group_id = "<advantage group>:axpo"``)."""
AXPO_ESTIMATOR = "axpo"


@register_rllm_adv_estimator(AXPO_ESTIMATOR)
def axpo_advantages(rewards: list[np.ndarray], algorithm_config: Any, **kwargs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """docs/algorithm.md §6 on the grouping hook's groups.

    The hook already made the groups AXPO's (continuation groups per prefix, the source's reward
    replaced by r_prefix), so what is left is GRPO's normalisation inside each group, with the
    core's settings. When the hook stored the core's own per-row advantage it is returned as is
    (the core is the single source of truth); either way the two agree.
    """
    groups: Sequence[TrajectoryGroup] = kwargs.get("traj_groups") or [None] * len(rewards)
    advantages = []
    for group_rewards, group in zip(rewards, groups):
        stored = [((t.metadata or {}).get("axpo_advantage")) for t in group.trajectories] if group is not None else [None]
        if group is not None and all(a is not None for a in stored):
            advantages.append(np.asarray(stored, dtype=np.float64))
            continue
        cfg = _group_config(group)
        # the run's AXPOConfig already holds verl's norm_adv_by_std_in_grpo (AXPOConfig.from_algorithm)
        norm_by_std = cfg.norm_by_std if cfg is not None else std_normalization(algorithm_config)
        cfg = cfg or AXPOConfig()
        scores = np.asarray(group_rewards, dtype=np.float32)
        index = np.zeros(len(scores), dtype=np.int64)
        adv = group_normalize(
            torch.from_numpy(scores), torch.from_numpy(index), epsilon=cfg.epsilon,
            norm_by_std=norm_by_std, unbiased=cfg.std_unbiased,
        )
        advantages.append(adv.numpy().astype(np.float64))
    return advantages, advantages


def _group_config(group: TrajectoryGroup | None) -> AXPOConfig | None:
    for meta in (group.metadata if group is not None else []) or []:
        if isinstance(meta, dict) and isinstance(meta.get("axpo_config"), AXPOConfig):
            return meta["axpo_config"]
    return None

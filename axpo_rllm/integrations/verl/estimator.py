"""The ``axpo`` advantage estimator for verl, registered through the ``verl.plugins`` entry point.

verl imports every ``verl.plugins`` entry point on ``import verl`` — in every process, Ray actors
included — so ``algorithm.adv_estimator=axpo`` works with no import in user code. verl swallows
plugin import errors at DEBUG level; ``tests/core/test_verl_plugin.py`` checks the registration in
a fresh interpreter.

verl hands an estimator only ``token_level_rewards``, ``response_mask``, ``index`` (the ``uid``
column) and the ``algorithm`` config. AXPO therefore travels *in the batch*: the group builder
(``axpo_rllm.core.advantages.build_training_rows``) gives every continuation group its own uid, puts the
recovery reward in the source's row and edits ``response_mask`` to the loss mask
(``axpo_rllm.integrations.verl.batch.build_verl_batch``). On such a batch this estimator is the group
normalisation of docs/algorithm.md §6; on a batch with nothing triggered it is verl's GRPO.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from axpo_rllm.core.advantages import group_ids_to_index, group_normalize
from axpo_rllm.core.config import std_normalization

__all__ = ["compute_axpo_advantage", "ESTIMATOR_NAME"]

ESTIMATOR_NAME = "axpo"


def _setting(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    axpo = config.get("axpo", None)
    if axpo is None:
        return default
    return axpo.get(key, default)


@register_adv_est(ESTIMATOR_NAME)
def compute_axpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AXPO advantages (docs/algorithm.md §6) on a batch built by ``build_verl_batch``.

    A_i = (s_i − mean_{g(i)} s) / (std_{g(i)} s + ε) on the tokens where ``response_mask`` is 1,
    where s_i = Σ_t token_level_rewards[i, t] (the recovery reward r_prefix for a credited source)
    and g(i) = uid (the question for originals, ``question::source`` for a continuation group).

    Args:
        token_level_rewards: ``(bs, response_length)``.
        response_mask: ``(bs, response_length)``, AXPO's loss mask (prefix-only for a source,
            continuation-only for a resampled row).
        index: ``(bs,)`` object array, verl's ``uid`` column (the advantage group).
        config: verl's ``algorithm`` config; reads ``norm_adv_by_std_in_grpo`` (as verl's ``grpo``
            does; ``std_normalization``) and ``axpo.epsilon`` / ``axpo.std_unbiased``.

    Returns:
        ``(advantages, returns)``, both ``(bs, response_length)`` and already multiplied by the mask.
    """
    if index is None:
        raise ValueError("the axpo estimator needs the batch's `uid` column (its advantage groups)")
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"uid has {len(index)} entries for a batch of {token_level_rewards.shape[0]} rows")
    norm_by_std = std_normalization(config)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        advantages = group_normalize(
            scores,
            group_ids_to_index(index),
            epsilon=float(_setting(config, "epsilon", 1e-6)),
            norm_by_std=norm_by_std,
            unbiased=bool(_setting(config, "std_unbiased", True)),
        )
        advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages

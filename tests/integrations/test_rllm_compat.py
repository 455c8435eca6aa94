"""rllm 0.3.0rc0 on verl 0.9.1: the two bridges, the version check and the rollout-vs-actor guard.

The bridges act on verl's side, so they are tested here against the installed verl without rllm:
each test first shows the break rllm meets (the call rllm's backend makes, the key rllm's
``sync_config`` writes), then the bridged behaviour.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from axpo_rllm.core.failures import RolloutPolicyMismatch, check_logprob_gap  # noqa: E402
from axpo_rllm.integrations.rllm import compat  # noqa: E402
from axpo_rllm.integrations.rllm.launcher import check_versions  # noqa: E402
from axpo_rllm.integrations.verl import policy_guard  # noqa: E402


def test_checkpoint_manager_accepts_rllms_trainer_keyword():
    import verl.checkpoint_engine.base as base

    manager = base.CheckpointEngineManager
    assert getattr(manager, "_axpo_bridged", False), "the bridge is installed where verl loads plugins"
    params = inspect.signature(manager.__init__).parameters
    assert "actor_wg" in params  # verl 0.9's name

    class Recorder:  # verl 0.9's signature; records what it is given
        def __init__(self, config, actor_wg, replicas):
            self.seen = (config, actor_wg, replicas)

    with pytest.raises(TypeError, match="trainer"):  # what rllm's call meets without the bridge
        Recorder(config="cfg", trainer="wg", replicas=["r"])
    compat.bridge_checkpoint_manager(type("M", (), {"CheckpointEngineManager": Recorder}))
    made = Recorder(config="cfg", trainer="wg", replicas=["r"])  # rllm's call (verl_backend.py)
    assert made.seen == ("cfg", "wg", ["r"])


def _synced_config(mode: str):
    """What rllm's sync_config leaves on the actor: its router replay mode under verl 0.8's key."""
    return OmegaConf.create({"actor_rollout_ref": {"actor": {"strategy": "fsdp2", "router_replay": {"mode": mode}}}})


def test_router_replay_key_is_dropped_when_verls_fsdp_actor_has_none():
    from verl.workers.config import FSDPActorConfig

    assert not compat.actor_has_router_replay(), "verl 0.9 moved router replay off the FSDP actor"
    with pytest.raises(TypeError, match="router_replay"):  # what verl's workers meet without the bridge
        FSDPActorConfig(router_replay={"mode": "disabled"})
    cfg = _synced_config("disabled")
    compat.drop_router_replay(cfg)
    assert "router_replay" not in cfg.actor_rollout_ref.actor
    with pytest.raises(ValueError, match="router_replay='R3'"):
        compat.drop_router_replay(_synced_config("R3"))


def test_verls_validate_config_drops_the_key_first():
    import verl.utils.config as verl_config

    assert getattr(verl_config.validate_config, "_axpo_bridged", False)
    seen = []
    fake = type("M", (), {"validate_config": staticmethod(lambda config, **kw: seen.append(dict(config.actor_rollout_ref.actor)))})
    compat.bridge_router_replay(fake)
    fake.validate_config(config=_synced_config("disabled"), use_reference_policy=True, use_critic=False)
    assert seen == [{"strategy": "fsdp2"}]


@pytest.mark.parametrize("verl, vllm, ok", [
    ("0.9.1", "0.32.0+cpu", True),
    ("0.9.1", "0.32.1", True),
    ("0.8.0", "0.22.1", True),
    ("0.9.1", "0.22.1", False),
    ("0.8.0", "0.32.0", False),
    ("0.9.0", "0.32.0", False),
    ("0.9.1", None, False),
])
def test_version_check_names_the_tested_pairs(verl, vllm, ok):
    found = {"rllm": "0.3.0rc0", "verl": verl, "vllm": vllm}
    if ok:
        assert verl in check_versions(found)
    else:
        with pytest.raises(ValueError, match="verl==0.9.1 with vllm 0.32.*verl==0.8.0 with vllm 0.22.1"):
            check_versions(found)


def test_logprob_gap_is_a_mean_over_response_tokens():
    rollout = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    actor = torch.tensor([[-1.5, -2.0, -1.0, -9.0], [-1.0, -2.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    gap, tokens = policy_guard.logprob_gap(rollout, actor, mask)
    assert tokens == 5 and gap == pytest.approx((0.5 + 0 + 2 + 0 + 1) / 5)


def test_a_step_whose_rollout_weights_are_not_the_actors_stops(monkeypatch):
    """verl's own debug-metric function, on a batch like the one a ``dummy`` load format gives."""
    from verl import DataProto
    from verl.utils.debug import metrics

    actor = torch.log(torch.full((2, 4), 0.5))
    batch = DataProto.from_dict({"rollout_log_probs": actor + torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 0.0, 0.0]]),
                                 "old_log_probs": actor, "response_mask": torch.ones(2, 4, dtype=torch.long),
                                 "responses": torch.zeros(2, 4, dtype=torch.long)})
    monkeypatch.delenv(policy_guard.LIMIT_ENV, raising=False)
    assert policy_guard.GAP_METRIC not in metrics.calculate_debug_metrics(batch), "unarmed outside axpo-rllm runs"
    monkeypatch.setenv(policy_guard.LIMIT_ENV, "0.5")
    with pytest.raises(RolloutPolicyMismatch, match="load_format"):
        metrics.calculate_debug_metrics(batch)  # mean gap 0.75
    close = DataProto.from_dict({**{k: v for k, v in batch.batch.items()}, "rollout_log_probs": actor + 1e-4})
    assert metrics.calculate_debug_metrics(close)[policy_guard.GAP_METRIC] == pytest.approx(1e-4, rel=1e-3)


def test_nan_gap_is_a_mismatch():
    with pytest.raises(RolloutPolicyMismatch):
        check_logprob_gap(float("nan"), 0.5, 10)
    check_logprob_gap(0.0, 0.5, 0)  # no response token: nothing to compare

"""The GPU launcher builds its config without rllm and fails clearly when rllm is missing."""

from __future__ import annotations

import importlib.util

import pytest

from axpo_rllm.configs.loader import ABLATIONS, axpo_config
from axpo_rllm.integrations.rllm.launcher import DEFAULT_WORKFLOW, launch_config, main, resolve_workflow, workflow_config

HAS_RLLM = importlib.util.find_spec("rllm") is not None


@pytest.mark.parametrize("ablation", [None, *ABLATIONS])
def test_every_ablation_is_the_same_pipeline_with_the_axpo_estimator(ablation):
    cfg = launch_config(ablation)
    assert cfg.algorithm.adv_estimator == "axpo"
    assert cfg.axpo_launch.backend == "verl" and cfg.axpo_launch.workflow_class == DEFAULT_WORKFLOW
    assert cfg.actor_rollout_ref.rollout.n == (16 if ablation == "rollout_2x" else 8)
    assert cfg.rllm.rollout.n == 1, "the workflow draws the N rollouts of a question itself"
    assert workflow_config(cfg).n == cfg.actor_rollout_ref.rollout.n
    assert workflow_config(cfg).axpo == axpo_config(cfg)
    actor = cfg.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.kl_loss_coef, actor.kl_loss_type) == (0.2, 0.4, 0.001, "low_var_kl")
    axpo = axpo_config(cfg)
    assert axpo.enable == (ablation not in ("grpo", "rollout_2x"))


def test_overrides_reach_the_config_and_n_lives_in_the_workflow():
    cfg = launch_config("random_rank", ["algorithm.axpo.r=0.5", "actor_rollout_ref.rollout.n=4",
                                        "trainer.n_gpus_per_node=8", "data.train_batch_size=32", "agent.max_turns=2"])
    assert axpo_config(cfg).r == 0.5 and axpo_config(cfg).ranking == "random"
    assert workflow_config(cfg).n == 4 and cfg.rllm.rollout.n == 1
    assert workflow_config(cfg).agent.max_turns == 2
    assert cfg.trainer.n_gpus_per_node == 8
    assert cfg.rllm.workflow.n_parallel_tasks == 32, "every question of a step must be in flight (the plan's barrier)"
    with pytest.raises(ValueError, match="actor_rollout_ref.rollout.n"):
        launch_config(None, ["rllm.rollout.n=4"])


def test_rllm_base_config_is_kept_under_the_axpo_layer():
    base = {"algorithm": {"adv_estimator": "grpo", "gamma": 1.0}, "rllm": {"workflow": {"n_parallel_tasks": 64}}}
    cfg = launch_config(None, base=base)
    assert cfg.algorithm.adv_estimator == "axpo" and cfg.algorithm.gamma == 1.0
    assert cfg.rllm.workflow.n_parallel_tasks == 64


def test_bad_values_fail_before_any_gpu_is_touched():
    with pytest.raises(ValueError, match="unknown keys"):
        launch_config(None, ["algorithm.axpo.rr=0.5"])
    with pytest.raises(ValueError, match="adv_estimator must stay 'axpo'"):
        launch_config(None, ["algorithm.adv_estimator=grpo"])
    with pytest.raises(ValueError, match="unknown ablation"):
        launch_config("nope")


def test_workflow_class_resolution_errors_name_the_problem():
    assert resolve_workflow("axpo_rllm.agents.workflow:AXPOWorkflow").__name__ == "AXPOWorkflow"
    with pytest.raises(ValueError, match="package.module:Class"):
        resolve_workflow("no_colon")
    with pytest.raises(ImportError, match="has no 'Nope'"):
        resolve_workflow("axpo_rllm.agents.workflow:Nope")
    with pytest.raises(ImportError, match="cannot be imported"):
        resolve_workflow("axpo_rllm.not_a_module:X")


def test_print_config_needs_no_rllm(capsys):
    assert main(["--ablation", "grpo", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "adv_estimator: axpo" in out and "enable: false" in out


@pytest.mark.skipif(HAS_RLLM, reason="rllm is installed here")
def test_without_rllm_the_launcher_says_how_to_install_it(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "rllm is not installed" in err and "git+https://github.com/rllm-org/rllm" in err

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
    assert cfg.axpo_launch.group_size == (16 if ablation == "rollout_2x" else 8)
    assert cfg.rllm.rollout.n == 1, "the workflow draws the N rollouts of a question itself"
    assert workflow_config(cfg).n == cfg.axpo_launch.group_size
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


def test_the_axpo_layer_is_written_into_rllms_own_keys():
    cfg = launch_config(None, ["data.train_batch_size=32"])
    rllm = cfg.rllm
    assert (rllm.algorithm.kl_beta, rllm.algorithm.eps_clip, rllm.algorithm.eps_clip_high) == (0.001, 0.2, 0.4)
    assert rllm.data.train_batch_size == 32 and rllm.rollout.n == 1 and cfg.axpo_launch.group_size == 8
    assert rllm.rejection_sample.filter_uniform_groups is False and rllm.rejection_sample.min_trajs_per_group == 1
    assert rllm.compact_filtering.enable is False
    assert rllm.workflow.retry_limit == 1 and rllm.workflow.raise_on_error is False
    sampled = launch_config(None, ["data.train_batch_size=32", "actor_rollout_ref.rollout.temperature=0.7"])
    assert workflow_config(sampled).agent.temperature == 0.7, "the agent samples at the rollout's temperature"
    assert workflow_config(cfg).n == 8, "N is read from axpo_launch.group_size (rllm syncs rollout.n to 1)"


@pytest.mark.parametrize(("override", "message"), [
    ("rllm.async_training.enable=true", "async_training.enable must be false"),
    ("rllm.rejection_sample.filter_uniform_groups=true", "filter_uniform_groups must be False"),
    ("rllm.rejection_sample.min_trajs_per_group=2", "min_trajs_per_group must be 1"),
    ("rllm.data.train_batch_size=64", r"rllm.data.train_batch_size \(64\) must equal data.train_batch_size \(32\)"),
    ("rllm.workflow.n_parallel_tasks=8", "n_parallel_tasks must be >= the questions per step"),
    ("rllm.workflow.retry_limit=3", "retry_limit must be 1"),
    ("rllm.workflow.raise_on_error=true", "raise_on_error must be False"),
    ("agent.temperature=0.7", r"agent.temperature=0.7 differs from actor_rollout_ref.rollout.temperature=1.0"),
])
def test_modes_that_bypass_axpo_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        launch_config(None, ["data.train_batch_size=32", override])


@pytest.mark.rllm
def test_rllms_own_sync_keeps_the_axpo_layer():
    """Compose the final config the way rllm's trainer does: its hydra config, our layer, then its
    ``sync_config`` (rllm's values win over verl's on shared keys)."""
    pytest.importorskip("rllm")
    from rllm.trainer.verl.utils import sync_config

    from axpo_rllm.integrations.rllm.launcher import compose_rllm_base

    cfg = launch_config(None, ["data.train_batch_size=32", "agent.max_turns=3"], base=compose_rllm_base())
    sync_config(cfg, hydra_overrides=["data.train_batch_size=32"])
    actor = cfg.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.kl_loss_coef, actor.use_kl_loss, actor.kl_loss_type) == \
        (0.2, 0.4, 0.001, True, "low_var_kl")
    assert cfg.data.train_batch_size == cfg.rllm.data.train_batch_size == 32
    assert cfg.actor_rollout_ref.rollout.n == 1, "rllm syncs verl's n to its own"
    config = workflow_config(cfg)
    assert config.n == 8 and config.agent.max_turns == 3 and config.axpo.k == 4


@pytest.mark.parametrize("model", ["qwen3_vl_2b_thinking", "qwen3_vl_4b_thinking", "qwen3_vl_8b_thinking"])
def test_shipped_model_configs_carry_the_papers_settings(model):
    from axpo_rllm.integrations.rllm.launcher import dry_run

    cfg, notes = dry_run(None, [], model=model)
    size = model.split("_")[2].upper()
    assert cfg.actor_rollout_ref.model.path == f"Qwen/Qwen3-VL-{size}-Thinking"
    assert cfg.axpo_launch.group_size == 8 and axpo_config(cfg).k == 4 and axpo_config(cfg).r == 0.25
    assert cfg.agent.max_turns == 3 and sorted(cfg.axpo_launch.tools) == ["crop", "python", "search"]
    actor = cfg.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.kl_loss_coef, actor.kl_loss_type) == (0.2, 0.4, 0.001, "low_var_kl")
    assert cfg.actor_rollout_ref.rollout.name == "vllm" and cfg.actor_rollout_ref.rollout.val_kwargs.n >= 4
    grpo, _ = dry_run("grpo", [], model=model)
    assert not axpo_config(grpo).enable and grpo.axpo_launch.group_size == 8
    assert any("N=8" in n for n in notes)


@pytest.mark.parametrize(("override", "message"), [
    ("bogus.key=1", r"unknown config key\(s\) \['bogus.key'\]"),
    ("data.train_files=/no/such.parquet", r"data.train_files: no such file"),
    ("actor_rollout_ref.rollout.name=hf", "rollout.name must be one of"),
    ("actor_rollout_ref.rollout.mode=sync", "rollout.mode must be 'async'"),
    ("axpo_launch.tools=[crop,zoom]", r"\['zoom'\] are not installed tools"),
])
def test_the_dry_run_names_the_bad_key(override, message):
    from axpo_rllm.integrations.rllm.launcher import dry_run

    with pytest.raises(ValueError, match=message):
        dry_run(None, [override], model="qwen3_vl_2b_thinking")


def test_axpo_rllm_train_dry_run_prints_the_merged_config(capsys):
    from axpo_rllm.cli import main as cli

    # B=64: verl refuses a batch below the shipped ppo_mini_batch_size (32), as the run would
    assert cli(["train", "--model", "qwen3_vl_2b_thinking", "--dry-run", "data.train_batch_size=64"]) == 0
    out, err = capsys.readouterr()
    assert "group_size: 8" in out and "kl_beta: 0.001" in out and "# checked:" in err
    assert cli(["train", "--dry-run", "bogus.key=1", "--model", "qwen3_vl_2b_thinking"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_tools_are_built_once_per_process_from_one_tools_section(monkeypatch):
    import pickle

    from axpo_rllm.integrations.rllm.launcher import tool_env_factory

    cfg = launch_config(None, ["axpo_launch.tools=[crop,python]", "+axpo_launch.tool_configs.python.pool_size=1",
                               "+axpo_launch.tool_configs.crop.coordinates=absolute",
                               # about sharing, on any machine: the floor has its own test
                               "axpo_launch.tool_configs.python.min_isolation=rlimits",
                               "axpo_launch.tool_configs.python.private_uid=false"])
    factory = tool_env_factory(cfg)
    again = pickle.loads(pickle.dumps(factory))  # what crosses to a Ray worker
    a, b = factory(), again()
    assert a is not b and a.tools["python"] is b.tools["python"], "one sandbox pool per process and configuration"
    assert a.tools["python"].pool_size == 1 and a.tools["crop"].config["coordinates"] == "absolute"


@pytest.mark.parametrize("model", [None, "qwen3_vl_2b_thinking", "qwen3_vl_4b_thinking", "qwen3_vl_8b_thinking"])
def test_a_training_config_refuses_to_start_without_bwrap(model, monkeypatch, tmp_path):
    from axpo_rllm.envs.tools.sandbox import IsolationBelowFloor
    from axpo_rllm.integrations.rllm.launcher import tool_env_factory

    cfg = launch_config(None, [], model=model)
    assert cfg.axpo_launch.tool_configs.python == {"min_isolation": "bwrap", "private_uid": True}
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without bubblewrap
    monkeypatch.delenv("AXPO_SANDBOX_ISOLATION", raising=False)
    with pytest.raises(IsolationBelowFloor, match=r"no `bwrap` on PATH.*fix: install bubblewrap"):
        tool_env_factory(cfg)


def test_a_search_key_a_worker_would_not_see_fails_at_start(monkeypatch):
    from axpo_rllm.integrations.rllm.launcher import tool_env_factory

    base = ["+axpo_launch.tool_configs.search.backend=tavily"]
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"api_key_env='TAVILY_API_KEY': rllm forwards only .* name it e.g. RLLM_TAVILY_API_KEY"):
        tool_env_factory(launch_config(None, base))
    monkeypatch.delenv("RLLM_TAVILY_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"needs its API key in \$RLLM_TAVILY_API_KEY, which is not set"):
        tool_env_factory(launch_config(None, base + ["+axpo_launch.tool_configs.search.api_key_env=RLLM_TAVILY_API_KEY"]))
    monkeypatch.setenv("RLLM_TAVILY_API_KEY", "sk-test")
    assert tool_env_factory(launch_config(None, base + ["+axpo_launch.tool_configs.search.api_key_env=RLLM_TAVILY_API_KEY"]))
    with pytest.raises(ValueError, match="api_key_env"):
        tool_env_factory(launch_config(None, ["+axpo_launch.tool_configs.search.api_key=sk-test"]))


@pytest.mark.rllm
def test_the_dry_run_builds_what_the_workers_build():
    """verl's own validation and worker dataclasses, rllm's trainer configs: a section verl rejects
    fails the dry run naming it (the shipped model configs once lacked verl's micro-batch size)."""
    pytest.importorskip("rllm")
    from axpo_rllm.integrations.rllm.launcher import dry_run

    _, notes = dry_run(None, [], model="qwen3_vl_4b_thinking")
    assert any("validate_config and worker config dataclasses" in n for n in notes)
    with pytest.raises(ValueError, match="(?s)verl.*ppo_micro_batch_size"):
        dry_run(None, ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null"], model="qwen3_vl_4b_thinking")


@pytest.mark.rllm
def test_without_the_bridges_the_dry_run_shows_rllms_breaks_on_verl_0_9(monkeypatch):
    """What `axpo-rllm train --dry-run` says on CPU when rllm meets a verl it was not written for:
    the two breaks (found by the end-to-end run) with the bridges taken away."""
    pytest.importorskip("rllm")
    import verl.checkpoint_engine.base as ckpt
    import verl.utils.config as verl_config

    from axpo_rllm.integrations.rllm.launcher import dry_run

    monkeypatch.setattr(verl_config, "validate_config", verl_config.validate_config.__wrapped__)
    with pytest.raises(ValueError, match="(?s)verl.*router_replay"):
        dry_run(None, [], model="qwen3_vl_2b_thinking")
    monkeypatch.undo()
    monkeypatch.setattr(ckpt.CheckpointEngineManager, "__init__", ckpt.CheckpointEngineManager.__init__.__wrapped__)
    with pytest.raises(ValueError, match="CheckpointEngineManager"):
        dry_run(None, [], model="qwen3_vl_2b_thinking")


@pytest.mark.parametrize("model", [None, "qwen3_vl_2b_thinking"])
def test_rollout_2x_is_twice_the_runs_own_n(model):
    """'rollout 2x' means 2N of whatever N the run has: an override of N (or a model layer) is doubled."""
    for n in (4, 6):
        cfg = launch_config("rollout_2x", [f"actor_rollout_ref.rollout.n={n}"], model=model)
        assert cfg.axpo_launch.group_size == workflow_config(cfg).n == 2 * n
        assert launch_config(None, [f"actor_rollout_ref.rollout.n={n}"], model=model).axpo_launch.group_size == n


def test_axpo_rllm_train_dry_run_reports_rollout_2x_of_the_given_n(capsys):
    from axpo_rllm.cli import main as cli

    assert cli(["train", "--model", "qwen3_vl_2b_thinking", "--dry-run", "--ablation", "rollout_2x",
                "actor_rollout_ref.rollout.n=4"]) == 0
    out, err = capsys.readouterr()
    assert "group_size: 8" in out and "# checked: N=8 per question" in err


@pytest.mark.parametrize(("override", "message"), [
    ("algorithm.axpo.source_tail=keep", r"algorithm\.axpo\.source_tail=keep cannot be trained by the rllm launcher"),
    ("algorithm.axpo.r=0.001", r"algorithm\.axpo\.r / data\.train_batch_size / actor_rollout_ref\.rollout\.n / "
                               r"algorithm\.axpo\.k: AXPO budget E = floor\(r·B·N\) = floor\(0\.001·128·8\) = 1 is below K = 4"),
])
def test_configs_the_run_would_fail_on_are_refused_when_built_and_at_the_dry_run(override, message, capsys):
    from axpo_rllm.cli import main as cli
    from axpo_rllm.integrations.rllm.launcher import dry_run

    with pytest.raises(ValueError, match=message):
        launch_config(None, [override], model="qwen3_vl_2b_thinking")
    with pytest.raises(ValueError, match=message):
        dry_run(None, [override], model="qwen3_vl_2b_thinking")
    assert cli(["train", "--model", "qwen3_vl_2b_thinking", "--dry-run", override]) == 2
    assert override.split("=")[0] in capsys.readouterr().err
    launch_config("grpo", ["algorithm.axpo.r=0.001"], model="qwen3_vl_2b_thinking")  # GRPO plans nothing


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rllm.async_training.enable", True, "rllm.async_training.enable must be false"),
    ("rllm.rollout.n", 8, "rllm.rollout.n must be 1"),
    ("algorithm.adv_estimator", "grpo", "adv_estimator must stay 'axpo'"),
    ("axpo_launch.group_size", 3, "axpo_launch.group_size must be 8"),
    ("algorithm.axpo.source_tail", "keep", "source_tail=keep cannot be trained"),
    ("algorithm.axpo.k", 64, "is below K = 64"),
])
def test_run_refuses_a_config_built_another_way(key, value, message):
    """``run(cfg)`` checks what ``launch_config`` checks, before rllm is even imported."""
    from omegaconf import OmegaConf

    from axpo_rllm.integrations.rllm.launcher import run

    cfg = launch_config(None, ["data.train_batch_size=8"])
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ValueError, match=message):
        run(cfg)

"""``configs.loader.load_config``: the one merge order every entry point composes with, and the
AXPO defaults written once (axpo.yaml agrees with ``AXPOConfig``'s defaults)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from axpo_rllm.configs.loader import MODELS, axpo_config, config_text, load_config
from axpo_rllm.core.config import AXPOConfig


def test_axpo_yaml_writes_every_default_of_the_dataclass_and_agrees_with_it():
    algorithm = OmegaConf.create(config_text("axpo.yaml")).algorithm
    written = set(algorithm.axpo)
    # norm_by_std is verl's algorithm.norm_adv_by_std_in_grpo (written once, beside the axpo node)
    assert written == {f.name for f in fields(AXPOConfig)} - {"norm_by_std"}
    assert "norm_adv_by_std_in_grpo" in algorithm
    assert AXPOConfig.from_algorithm(OmegaConf.to_container(algorithm)) == AXPOConfig()


@pytest.mark.parametrize("model", MODELS)
def test_a_model_layer_restates_no_axpo_default(model):
    assert OmegaConf.select(OmegaConf.create(config_text(f"models/{model}.yaml")), "algorithm.axpo") is None


def test_the_merge_order_base_defaults_model_layers_ablation_settings_overrides():
    base = {"algorithm": {"axpo": {"k": 8}}, "only_base": 1}
    job = {"algorithm": {"axpo": {"enable": True, "r": 0.5}}, "rl": {"steps": 3}}
    cfg = load_config("grpo", ["rl.steps=7", "+extra.key=2"], base=base, model="qwen3_vl_2b_thinking",
                      layers=[job], settings=[{"rl": {"steps": 5}, "algorithm": {"axpo": {"seed": 9}}}])
    axpo = axpo_config(cfg)
    assert axpo.k == 4, "axpo.yaml wins over the framework's base"
    assert axpo.r == 0.5, "a job layer wins over the defaults"
    assert not axpo.enable, "the ablation wins over a job layer"
    assert axpo.seed == 9 and cfg.rl.steps == 7, "settings win over the files, overrides over settings"
    assert cfg.only_base == 1 and cfg.extra.key == 2 and "+extra" not in cfg


def test_a_typo_in_any_layer_fails_at_composition():
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(None, settings=[{"algorithm": {"axpo": {"rr": 0.5}}}])

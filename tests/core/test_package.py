"""The package as users get it: a wheel whose envs/ and agents/ live under axpo_rllm, with its yaml,
its entry points, and no top-level `envs` / `agents` to collide with (the OpenAI Agents SDK owns
`agents`)."""

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIRS = {"axpo_rllm": "axpo_rllm", "envs": "axpo_rllm.envs", "agents": "axpo_rllm.agents", "configs": "axpo_rllm.configs"}


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel and what the build printed (not quiet: the build backend's warnings show)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (path,) = out.glob("axpo_rllm-*.whl")
    return path, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(built):
    return built[0]


def _shipped_name(folder: str, path: Path) -> str:
    rel = path.relative_to(ROOT / folder)
    return ".".join([SHIPPED_DIRS[folder], *rel.parts]) if rel.parts else SHIPPED_DIRS[folder]


def expected_packages():
    """Every folder with an __init__.py or a yaml under the shipped roots, under its shipped name."""
    names = set()
    for folder in SHIPPED_DIRS:
        for marker in ("__init__.py", "*.yaml"):
            names |= {_shipped_name(folder, f.parent) for f in (ROOT / folder).rglob(marker)}
    return names


def wheel_paths(pattern: str) -> set[str]:
    """Every file matching ``pattern`` under the shipped roots, as its path inside the wheel."""
    return {"/".join([SHIPPED_DIRS[folder].replace(".", "/"), *f.relative_to(ROOT / folder).parts])
            for folder in SHIPPED_DIRS for f in (ROOT / folder).rglob(pattern)}


def test_building_the_wheel_prints_no_packaging_warning(built):
    # Case-sensitive: Python warning classes (BuildBackendWarning, SetuptoolsDeprecationWarning, ...);
    # pip's own "WARNING:" lines about the machine's index configuration are not the package's.
    _, output = built
    warnings = [line.strip() for line in output.splitlines() if "Warning" in line]
    assert not warnings, "the build warns:\n" + "\n".join(warnings)


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    assert expected_packages() - listed == set(), "add these to [options] packages in setup.cfg"


def test_wheel_ships_envs_and_agents_inside_axpo_rllm_with_yaml_and_entry_points(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"axpo_rllm"}, f"top-level names in the wheel: {tops}"
    assert "axpo_rllm/envs/__init__.py" in names and "axpo_rllm/agents/__init__.py" in names
    yaml = wheel_paths("*.yaml")
    assert {"axpo_rllm/configs/axpo.yaml", "axpo_rllm/configs/ablation/grpo.yaml",
            "axpo_rllm/configs/models/qwen3_vl_4b_thinking.yaml"} <= yaml  # the walk found the folders
    assert yaml - set(names) == set(), "yaml missing from the wheel"
    assert "axpo_rllm/configs/loader.py" in names
    for layer in ("core", "engines", "envs/adapters", "agents", "integrations/verl", "integrations/rllm", "train", "data", "demo"):
        assert f"axpo_rllm/{layer}/__init__.py" in names, layer
    helpers = [n for n in names if n.rsplit("/", 1)[-1] in ("synthetic_rollouts.py", "tool_biased_engine.py", "testing.py", "synthetic.py")]
    assert not helpers, f"test helpers ship in the wheel: {helpers}"
    for package in expected_packages():
        assert any(n.startswith(package.replace(".", "/") + "/") for n in names), package
    assert wheel_paths("__init__.py") - set(names) == set(), "packages missing from the wheel"
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "[verl.plugins]" in entry_points and "axpo = axpo_rllm.integrations.verl.estimator" in entry_points
    assert "[axpo_rllm.tools]" in entry_points and "crop = axpo_rllm.envs.tools.crop:CropTool" in entry_points
    assert "[rllm.evaluators]" in entry_points and "axpo = axpo_rllm.data.rllm_evaluator:AXPOEvaluator" in entry_points


def test_wheel_in_a_fresh_venv_imports_and_finds_its_yaml(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)])
    probe = (
        "import importlib.util, importlib.resources, sys\n"
        "import axpo_rllm.envs, axpo_rllm.agents, axpo_rllm.core.records\n"
        "assert importlib.util.find_spec('envs') is None, 'top-level envs installed'\n"
        "assert importlib.util.find_spec('agents') is None, 'top-level agents installed'\n"
        "text = importlib.resources.files('axpo_rllm.configs').joinpath('axpo.yaml').read_text()\n"
        "assert 'adv_estimator: axpo' in text\n"
        "print(axpo_rllm.envs.__file__)\n"
    )
    # numpy is the records' one dependency: borrow this interpreter's copy without the project itself.
    numpy_dir = Path(__import__("numpy").__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "deps")}
    (tmp_path / "deps").mkdir()
    (tmp_path / "deps" / "numpy").symlink_to(numpy_dir / "numpy")
    if (numpy_dir / "numpy.libs").exists():
        (tmp_path / "deps" / "numpy.libs").symlink_to(numpy_dir / "numpy.libs")
    out = run([str(py), "-c", probe], cwd=tmp_path, env=env)
    assert str(venv) in out and "site-packages/axpo_rllm/envs/__init__.py" in out


def test_shipped_yaml_loads_with_every_ablation():
    from axpo_rllm.configs.loader import ABLATIONS, axpo_config, group_size, load_config

    assert axpo_config(load_config()).k == 4
    switches = {name: axpo_config(load_config(name)) for name in ABLATIONS}
    assert not switches["grpo"].enable and not switches["rollout_2x"].enable
    assert group_size(load_config("rollout_2x")) == 16 and group_size(load_config()) == 8
    assert not switches["no_prefix_fix"].prefix_fix
    assert switches["no_tool_resampling"].resample_target == "no_tool"
    assert switches["random_rank"].ranking == "random"
    assert not switches["no_prefix_credit"].prefix_credit
    assert not switches["no_separate_group"].separate_groups
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(overrides=["algorithm.axpo.rr=1"])
    with pytest.raises(ValueError, match="unknown ablation"):
        load_config("nope")


def test_cli_plan_demo_runs():
    out = run([sys.executable, "-m", "axpo_rllm.cli", "plan-demo", "--questions", "16"])
    assert "axpo/prefixes_selected" in out and "training rows" in out


def test_cli_plan_demo_rollout_2x_doubles_the_given_n():
    out = run([sys.executable, "-m", "axpo_rllm.cli", "plan-demo", "--questions", "4", "--ablation", "rollout_2x",
               "actor_rollout_ref.rollout.n=4"])
    assert "N=8" in " ".join(out.split())

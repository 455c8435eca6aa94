"""The rollout-engine interface, by its public names: the token-in/token-out contract
(:mod:`.contract`) and the two executors that feed an in-process backend (:mod:`.batching`:
one backend call per batch; :mod:`.stepping`: continuous batching). Import from here; the
modules behind it are free to move.
"""

from __future__ import annotations

from .batching import BatchingExecutor, InProcessEngine
from .contract import BackendContractError, EngineError, GenerationRequest, GenerationResult
from .contract import RolloutEngine, check_image_pads, checked_result
from .stepping import SteppingBackend, SteppingExecutor

__all__ = [
    "EngineError",
    "BackendContractError",
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "InProcessEngine",
    "checked_result",
    "BatchingExecutor",
    "SteppingBackend",
    "SteppingExecutor",
    "check_image_pads",
]

"""The token-in/token-out contract every rollout engine implements: the request, the result, the
errors and the abstract engine (the executors that feed a backend are :mod:`.batching` and
:mod:`.stepping`).

Why token-in/token-out: AXPO resamples continuations from a prefix of a rollout, so the engine
must accept exactly the token ids a previous call returned (plus the same images) and produce
the logprobs the trainer will compare against. Text round trips re-tokenise and break that.

Prompt convention (docs/upstream.md §1b): ``prompt_ids`` hold **one unexpanded** ``<|image_pad|>``
per image, as the chat template renders it; each engine expands pads to the vision tower's token
count itself. Logprobs are **raw** (the model's distribution before temperature, top-p and bans:
vLLM's default ``raw_logprobs``), one per generated token.

Engines are adapters at the edge: the algorithm consumes :class:`GenerationResult` and never
imports a concrete engine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "FINISH_REASONS",
    "EngineError",
    "BackendContractError",
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "checked_result",
    "check_image_pads",
    "engine_error",
]

FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineError(RuntimeError):
    """A generation could not be produced; the workflow records it as an ``error`` rollout.

    ``request_id`` names the failed request (empty when the failure was not request-specific).
    """

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(f"[request {request_id}] {message}" if request_id else message)
        self.request_id = request_id


class BackendContractError(RuntimeError):
    """The backend broke the token-in/token-out contract for a request that was well formed:
    no log-probs, ids and log-probs of different lengths, an unknown finish reason.

    Not an :class:`EngineError`: retrying cannot help (every request would fail the same way, e.g.
    a server asked for log-probs in a form it reads as "none"), so the agent and the workflow let it
    propagate and the step stops with this message instead of training on failed rollouts.
    """

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(f"[request {request_id}] {message}" if request_id else message)
        self.request_id = request_id


@dataclass(frozen=True)
class GenerationRequest:
    """One sampling call (filled by the agent)."""

    prompt_ids: tuple[int, ...]
    """The full context so far, with one unexpanded ``<|image_pad|>`` per image."""
    images: tuple[Any, ...] = ()
    """``PIL.Image.Image`` objects, one per image pad in ``prompt_ids``, in order."""
    max_tokens: int = 256
    temperature: float = 1.0
    """0 means greedy decoding; at most 2 (vLLM's and OpenAI's bound, enforced for every engine)."""
    top_p: float = 1.0
    seed: int | None = None
    """Per-request seed: the same request with the same seed gives the same tokens, whatever else
    is in the batch. None draws a fresh seed."""
    stop: tuple[str, ...] = ()
    """Stop strings; the token that completes one is kept in ``token_ids`` (vLLM's behaviour)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop ids on top of the model's EOS ids; the stop token is kept in ``token_ids``."""
    banned_token_ids: tuple[int, ...] | None = None
    """Ids never sampled. None means the engine default: the image and video pad ids (a random
    model emits them, which breaks the next turn's image count; docs/upstream.md §2)."""
    request_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.banned_token_ids is not None:
            object.__setattr__(self, "banned_token_ids", tuple(int(t) for t in self.banned_token_ids))
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_ids is empty")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}")
        if not (0 <= self.temperature <= 2):
            raise ValueError(f"request {self.request_id!r}: temperature must be in [0, 2], got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"request {self.request_id!r}: top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError(f"request {self.request_id!r}: stop strings must be non-empty, got {self.stop!r}")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced (filled by the engine)."""

    token_ids: tuple[int, ...]
    """The generated ids, the stop token included."""
    logprobs: tuple[float, ...]
    """Raw logprob of each generated id under the model (same length as ``token_ids``)."""
    finish_reason: str
    """``stop`` (EOS, a stop id or a stop string), ``length`` (max_tokens), ``abort`` or ``error``."""
    stop_reason: int | str | None = None
    """The stop string or stop id that ended it; None for EOS or ``length``."""
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache (expanded count); -1 when the engine cannot tell."""
    request_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        object.__setattr__(self, "logprobs", tuple(float(x) for x in self.logprobs))
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"request {self.request_id!r}: {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


def checked_result(request: GenerationRequest, token_ids: Sequence[int], logprobs: Sequence[float] | None,
                   finish_reason: str, backend: str, **fields: Any) -> "GenerationResult":
    """A :class:`GenerationResult`, or :class:`BackendContractError` naming ``backend`` when it
    returned no log-probs (or not one per token) or an unknown finish reason."""
    if logprobs is None or len(logprobs) != len(token_ids):
        got = "none" if logprobs is None else f"{len(logprobs)}"
        raise BackendContractError(
            f"{backend} returned {len(token_ids)} token ids but {got} log-probs; the trainer needs the "
            "sampled token's log-prob for every generated token (check how the backend reads the "
            "request's log-prob setting)",
            request.request_id,
        )
    if finish_reason not in FINISH_REASONS:
        raise BackendContractError(f"{backend} returned finish_reason={finish_reason!r}; expected one of {FINISH_REASONS}",
                                   request.request_id)
    return GenerationResult(token_ids=token_ids, logprobs=logprobs, finish_reason=finish_reason,
                            request_id=request.request_id, **fields)


def check_image_pads(request: GenerationRequest, image_pad_id: int) -> None:
    """Raise :class:`EngineError` unless ``prompt_ids`` hold exactly one pad per image, none adjacent.

    vLLM accepts mismatches silently and wrongly (docs/upstream.md §1b), so every engine checks first.
    """
    ids = request.prompt_ids
    n_pads = sum(1 for t in ids if t == image_pad_id)
    if n_pads != len(request.images):
        raise EngineError(
            f"prompt_ids hold {n_pads} image pad(s) (id {image_pad_id}) but {len(request.images)} image(s) "
            "were given; expected one unexpanded pad per image",
            request.request_id,
        )
    if any(a == b == image_pad_id for a, b in zip(ids, ids[1:])):
        raise EngineError(
            "prompt_ids hold an expanded run of image pads; pass one unexpanded pad per image", request.request_id
        )


class RolloutEngine(abc.ABC):
    """Token-in/token-out generation with per-token logprobs.

    Subclasses implement :meth:`generate_many` (one batched call) and :meth:`score`; concurrent
    :meth:`generate` calls are funnelled into batches by :class:`BatchingExecutor` where the
    backend batches (vLLM) or simply awaited one by one.
    """

    @abc.abstractmethod
    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request; results in request order. Raises :class:`EngineError`."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one request (concurrent calls may be batched by the engine)."""
        return (await self.generate_many([request]))[0]

    @abc.abstractmethod
    async def score(
        self, prompt_ids: Sequence[int], images: Sequence[Any], continuation_ids: Sequence[int]
    ) -> list[float]:
        """Teacher-forced raw logprobs of ``continuation_ids`` after ``prompt_ids`` (+ images)."""

    def close(self) -> None:
        """Release the backend (threads, model, HTTP client). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_error(exc: BaseException, request_id: str) -> BaseException:
    """What a waiter gets: our own errors as they are, anything else as an :class:`EngineError`."""
    if isinstance(exc, (EngineError, BackendContractError)):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}", request_id)

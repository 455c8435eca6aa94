"""What a token-in/token-out request becomes on rllm's ``VerlEngine`` and back (no rllm import).

rllm's ``VerlEngine.get_token_output_from_token_input(token_input, **kwargs)`` merges ``kwargs``
over its own sampling parameters and hands them to verl's server manager. verl's rollout servers
read ``logprobs`` as a *flag*: the vLLM server does ``sampling_params["logprobs"] = 0 if
sampling_params.pop("logprobs", False) else None`` (0 = the sampled token's log-prob, vLLM's
convention; None = no log-probs) and the SGLang server ``return_logprob =
sampling_params.pop("logprobs", False)``. So the value we send must be truthy — rllm's own
default is ``logprobs=1`` — and never vLLM's ``0``, which verl reads as "none".
"""

from __future__ import annotations

from typing import Any

from axpo_rllm.engines.base import GenerationRequest, GenerationResult, checked_result
from axpo_rllm.engines.vision import BAN_LOGIT_BIAS

__all__ = ["LOGPROBS_FLAG", "verl_sampling_kwargs", "result_from_token_output"]

LOGPROBS_FLAG = 1
"""Truthy for verl's servers (see the module docstring); rllm's ``VerlEngine`` default."""


def verl_sampling_kwargs(request: GenerationRequest, application_id: str | None) -> dict[str, Any]:
    """The keyword arguments for ``VerlEngine.get_token_output_from_token_input`` (ids apart)."""
    kwargs: dict[str, Any] = dict(
        application_id=application_id, max_tokens=request.max_tokens, temperature=request.temperature,
        top_p=request.top_p, logprobs=LOGPROBS_FLAG,
    )
    if request.images:
        kwargs["image_data"] = list(request.images)
    if request.seed is not None:
        kwargs["seed"] = request.seed
    if request.stop:
        kwargs["stop"] = list(request.stop)
    if request.stop_token_ids:
        kwargs["stop_token_ids"] = list(request.stop_token_ids)
    if request.banned_token_ids:
        kwargs["logit_bias"] = {int(t): BAN_LOGIT_BIAS for t in request.banned_token_ids}
    return {k: v for k, v in kwargs.items() if v is not None}


def result_from_token_output(request: GenerationRequest, out: Any) -> GenerationResult:
    """verl's ``TokenOutput`` (``token_ids``, ``log_probs``, ``stop_reason``) as our result; no
    log-probs is a :class:`~axpo_rllm.engines.base.BackendContractError` (the step stops)."""
    ids = list(out.token_ids)
    logprobs = None if out.log_probs is None else list(out.log_probs)
    finish = "length" if out.stop_reason == "length" or len(ids) >= request.max_tokens else "stop"
    return checked_result(request, ids, logprobs, finish, "the rllm/verl rollout server")

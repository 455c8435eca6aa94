"""The chat format: token-level rendering through the model's own chat template.

Prompts are rendered once; observation turns are rendered alone and appended to the kept ids, so a
rollout's tokens are exactly what the model produced plus what the environment fed back
(docs/algorithm.md §2: continuations are requested as ``prompt + prefix`` ids, never re-rendered text).

Where the ids differ on purpose from tokenising the template's rendering of the same conversation:

- **tool output is plain text**: the text a tool returns (and what sandboxed code prints) is
  tokenised without matching added tokens, so ``<|im_end|>``, ``<|im_start|>``, ``<|image_pad|>``,
  ``</tool_response>`` … written by a tool become ordinary pieces, never control ids: a tool cannot
  forge the conversation or the image count. The template's own glue keeps its control tokens;
- **the model's turns are its own tokens**: a re-render may tokenise the same text differently,
  and Qwen3-Thinking templates re-render earlier reasoning as ``<think>\n{reasoning.strip()}\n</think>\n\n``;
  we keep what the model generated (what the policy gradient needs);
- **one tool turn per assistant turn**: a turn's calls are answered in one user turn of
  ``<tool_response>`` blocks, in call order, each with its images — as the templates render
  consecutive tool messages.
"""

from __future__ import annotations

from typing import Any, Sequence

from axpo_rllm.agents.parsing import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN
from axpo_rllm.core.records import Task
from axpo_rllm.engines.vision import image_token_count, load_image_processor

__all__ = ["ChatFormat"]

_SLOT = "\x00axpo-tool-output-{}\x00"
"""Stands in for tool text while the template renders (NUL never occurs in template text)."""


class ChatFormat:
    """Token-level rendering through the model's own chat template (tokenizer or processor).

    ``image_processor`` (default: the processor's, else the one saved beside the tokenizer) counts
    the tokens an image expands to, for the context budget.
    """

    def __init__(self, tokenizer_or_processor: Any, image_processor: Any = None) -> None:
        tok = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        self.tokenizer = tok
        self._template_owner = tokenizer_or_processor if hasattr(tokenizer_or_processor, "apply_chat_template") else tok
        self._image_processor = image_processor or getattr(tokenizer_or_processor, "image_processor", None)
        self.call_open_id = self._single_id(CALL_OPEN)
        self.call_close_id = self._single_id(CALL_CLOSE)
        self.think_close_id = self._single_id(THINK_CLOSE, required=False)
        self.image_pad_id = self._single_id("<|image_pad|>")
        self.video_pad_id = self._single_id("<|video_pad|>", required=False)
        self.eos_ids = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)}
        self.turn_close_text = self._turn_close_text()
        self.think_open = self._render([{"role": "user", "content": "q"}], add_generation_prompt=True).rstrip().endswith(THINK_OPEN)
        """The generation prompt opens ``<think>`` (Qwen3-*-Thinking): every turn starts in the reasoning."""

    def _single_id(self, token: str, required: bool = True) -> int | None:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
        if required:
            raise ValueError(f"the tokenizer encodes {token!r} as {ids}; the agent needs it to be one token (Qwen-style)")
        return None

    def _render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
        return self._template_owner.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _turn_close_text(self) -> str:
        """What the template writes after an assistant turn's content (``<|im_end|>\\n`` for Qwen)."""
        marker = "ZQXJ-end-of-content"
        text = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}])
        return text[text.rindex(marker) + len(marker) :]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_plain(self, text: str) -> list[int]:
        """``text`` as ordinary pieces: the fast tokenizer's normaliser, pre-tokeniser and model,
        without the added-token matching that would turn ``<|im_end|>`` etc. into control ids."""
        backend = self.tokenizer.backend_tokenizer
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]

    def image_tokens(self, image: Any) -> int:
        """The number of tokens ``image``'s pad expands to (the context budget counts these)."""
        if self._image_processor is None:
            self._image_processor = load_image_processor(self.tokenizer.name_or_path)
        return image_token_count(self._image_processor, image)

    def decode(self, ids: Sequence[int]) -> str:
        """Model text as the parser reads it: control tokens dropped, agent tokens kept."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, task: Task, tools: list[dict] | None, system_prompt: str | None) -> list[int]:
        """System + tools block + the user turn (one unexpanded image pad per task image) + ``assistant\\n``."""
        messages: list[dict] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        content = [{"type": "image"} for _ in task.images] + [{"type": "text", "text": task.question}]
        messages.append({"role": "user", "content": content})
        return self.encode(self._render(messages, tools=tools or None, add_generation_prompt=True))

    def observation_ids(
        self, responses: Sequence[tuple[str, int]], last_model_token: int | None, hint: str | None = None
    ) -> list[int]:
        """The tokens between a tool-call turn and the next assistant turn.

        ``responses``: one ``(text, n_images)`` per call of the turn, in call order. ``<|im_end|>\n``
        closes the assistant turn unless the model already ended it with EOS, then the template's
        tool turn (each response's text as plain text + one image part per returned image), an
        optional user hint, and the next generation prompt.
        """
        base = [{"role": "user", "content": "q"}]
        messages = base + [
            {"role": "tool", "content": [{"type": "text", "text": _SLOT.format(i)}] + [{"type": "image"}] * n}
            for i, (_, n) in enumerate(responses)
        ]
        if hint:
            messages.append({"role": "user", "content": hint})
        full = self._render(messages, add_generation_prompt=True)
        head = self._render(base)
        if not full.startswith(head):
            raise ValueError("the chat template does not render a tool turn as an extension of the conversation")
        close = self.turn_close_text
        if last_model_token is not None and last_model_token in self.eos_ids:
            eos_text = self.tokenizer.convert_ids_to_tokens(int(last_model_token))
            close = close[len(eos_text) :] if close.startswith(eos_text) else close
        glue = close + full[len(head) :]
        ids: list[int] = []
        for i, (text, _) in enumerate(responses):
            before, slot, glue = glue.partition(_SLOT.format(i))
            if not slot:
                raise ValueError(f"the chat template dropped tool response {i}'s text")
            ids += self.encode(before) + self.encode_plain(text)
        ids += self.encode(glue)
        want = sum(n for _, n in responses)
        pads = sum(1 for t in ids if t == self.image_pad_id)
        if pads != want:
            raise ValueError(f"the observation turn renders {pads} image pads for {want} image(s)")
        return ids

    def answer_offset(self, turn_ids: Sequence[int]) -> int:
        """Index in the turn of the first token after ``</think>`` (0 when the turn has none)."""
        ids = list(turn_ids)
        if self.think_close_id is not None and self.think_close_id in ids:
            return ids.index(self.think_close_id) + 1
        return 0

"""The chat format: token-level rendering through the model's own chat template.

Prompts are rendered once; observation turns are rendered alone and appended to the kept ids, so a
rollout's tokens are exactly what the model produced plus what the environment fed back
(AXPO_SPEC §2: continuations are requested as ``prompt + prefix`` ids, never re-rendered text).
"""

from __future__ import annotations

from typing import Any, Sequence

from axpo_rllm.agents.parsing import CALL_CLOSE, CALL_OPEN, THINK_CLOSE
from axpo_rllm.core.records import Task

__all__ = ["ChatFormat"]


class ChatFormat:
    """Token-level rendering through the model's own chat template (tokenizer or processor).

    The prompt is rendered once; observation turns are rendered alone as the difference between
    two template renderings and tokenised on their own, then appended to the kept ids. Each starts
    at a special token (``<|im_end|>``/``<|im_start|>``), so tokenising it alone gives the same ids
    as tokenising the whole conversation.
    """

    def __init__(self, tokenizer_or_processor: Any) -> None:
        tok = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        self.tokenizer = tok
        self._template_owner = tokenizer_or_processor if hasattr(tokenizer_or_processor, "apply_chat_template") else tok
        self.call_open_id = self._single_id(CALL_OPEN)
        self.call_close_id = self._single_id(CALL_CLOSE)
        self.think_close_id = self._single_id(THINK_CLOSE, required=False)
        self.image_pad_id = self._single_id("<|image_pad|>")
        self.video_pad_id = self._single_id("<|video_pad|>", required=False)
        self.eos_ids = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)}
        self.turn_close_text = self._turn_close_text()

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

    def observation_ids(self, text: str, n_images: int, last_model_token: int | None, hint: str | None = None) -> list[int]:
        """The tokens between a tool-call turn and the next assistant turn.

        ``<|im_end|>\\n`` closes the assistant turn unless the model already ended it with EOS,
        then the template's tool turn (text + one image part per returned image), an optional user
        hint, and the next ``<|im_start|>assistant\\n``.
        """
        base = [{"role": "user", "content": "q"}]
        parts = [{"type": "text", "text": text}] + [{"type": "image"} for _ in range(n_images)]
        messages = base + [{"role": "tool", "content": parts}]
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
        ids = self.encode(close + full[len(head) :])
        pads = sum(1 for t in ids if t == self.image_pad_id)
        if pads != n_images:
            raise ValueError(f"the observation turn renders {pads} image pads for {n_images} image(s)")
        return ids

    def answer_offset(self, turn_ids: Sequence[int]) -> int:
        """Index in the turn of the first token after ``</think>`` (0 when the turn has none)."""
        ids = list(turn_ids)
        if self.think_close_id is not None and self.think_close_id in ids:
            return ids.index(self.think_close_id) + 1
        return 0

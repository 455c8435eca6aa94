"""HTTPEngine wire handling that needs no server (a real server is exercised in test_cross_engine)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from axpo_rllm.engines import EngineError, GenerationRequest, HTTPEngine
from axpo_rllm.engines.http_engine import _to_result

PAD, VIDEO = 9, 10


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_an_engine_error_naming_the_url():
    url = f"http://127.0.0.1:{_closed_port()}"
    engine = HTTPEngine(url, image_pad_id=PAD, video_pad_id=VIDEO, timeout_s=5)
    with pytest.raises(EngineError, match=f"POST {url}/inference/v1/generate failed"):
        asyncio.run(engine.generate(GenerationRequest(prompt_ids=(1, 2, 3), request_id="r7")))


def test_body_carries_tokens_images_bans_and_a_unique_id():
    from PIL import Image

    engine = HTTPEngine("http://x", image_pad_id=PAD, video_pad_id=VIDEO)
    request = GenerationRequest(prompt_ids=(1, PAD, 2), images=(Image.new("RGB", (4, 4)),), seed=3, stop=("</tool_call>",),
                                request_id="q:0")
    first, second = engine._body(request), engine._body(request)
    assert first["token_ids"] == [1, PAD, 2]
    assert first["content_parts"][0]["url"].startswith("data:image/png;base64,")
    assert first["sampling_params"]["logit_bias"] == {str(PAD): -100.0, str(VIDEO): -100.0}
    assert first["sampling_params"]["seed"] == 3 and first["sampling_params"]["stop"] == ["</tool_call>"]
    assert first["request_id"].startswith("q:0-") and first["request_id"] != second["request_id"]


def test_response_parsing_and_malformed_responses():
    request = GenerationRequest(prompt_ids=(1,), request_id="r")
    data = {
        "choices": [{"token_ids": [5, 6], "finish_reason": "stop", "stop_reason": 6,
                     "logprobs": {"content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 6, "logprob": -1.5}]}}],
        "usage": {"prompt_tokens_details": {"cached_tokens": 32}},
    }
    result = _to_result(data, request)
    assert (result.token_ids, result.logprobs, result.stop_reason, result.num_cached_tokens) == ((5, 6), (-0.5, -1.5), 6, 32)
    with pytest.raises(EngineError, match="unexpected response"):
        _to_result({"choices": []}, request)

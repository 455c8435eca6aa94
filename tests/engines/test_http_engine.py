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


class FakeGenerateServer:
    """A local HTTP/1.1 server for ``/inference/v1/generate``: answers two tokens after ``delay_s``,
    counts the TCP connections it accepted and the most requests it had in flight at once."""

    def __init__(self, delay_s: float = 0.05) -> None:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.connections, self.requests, self.in_flight, self.max_in_flight = 0, 0, 0, 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def log_message(self, *args):
                pass

            def setup(self):
                with lock:
                    outer.connections += 1
                super().setup()

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(delay_s)
                with lock:
                    outer.in_flight -= 1
                data = json.dumps({"choices": [{"token_ids": [5, 6], "finish_reason": "stop", "logprobs": {
                    "content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 6, "logprob": -1.5}]}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_one_pooled_client_keeps_connections_alive_under_a_real_concurrency_limit():
    server = FakeGenerateServer(delay_s=0.05)
    with server as url:
        engine = HTTPEngine(url, image_pad_id=PAD, video_pad_id=VIDEO, timeout_s=10, max_concurrency=3)

        async def step():
            # 24 turns in flight at once, each its own generate() call (as the agent sends them)
            first = await asyncio.gather(*(engine.generate(GenerationRequest(prompt_ids=(1, 2), request_id=f"r{i}"))
                                           for i in range(24)))
            connections = server.connections
            for i in range(6):  # then one after another: the same connections, kept alive
                await engine.generate(GenerationRequest(prompt_ids=(1,), request_id=f"s{i}"))
            return first, connections

        results, after_burst = asyncio.run(step())
        assert all(r.token_ids == (5, 6) and r.logprobs == (-0.5, -1.5) for r in results)
        assert server.max_in_flight == 3, "the limit caps the requests in flight across generate() calls"
        assert after_burst <= 3 and server.connections == after_burst, "requests reuse pooled connections"
        asyncio.run(engine.generate(GenerationRequest(prompt_ids=(1,), request_id="next-loop")))  # a new loop: a new client
        assert server.requests == 31 and server.connections <= after_burst + 3
        engine.close()

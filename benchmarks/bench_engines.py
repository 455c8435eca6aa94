"""Measure the rollout engines on the tiny Qwen-VL: build, start, throughput, cross-engine drift.

Run in ``.venv-vllm`` to include vLLM (``.venv-vllm/bin/python benchmarks/bench_engines.py``);
in the main venv only the transformers engine is measured. Prints one JSON object. Timings on a
shared 2-core machine vary by 2-3x with load: the output records the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8), "RGB")


def _prompt(tokenizer) -> list[int]:
    parts = [{"type": "image"}, {"type": "text", "text": "What color is the large square? Think first."}]
    out = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"])


def _throughput(engine, prompt, image, k: int, tokens: int) -> dict:
    from axpo_rllm.engines import GenerationRequest

    requests = [GenerationRequest(prompt_ids=prompt, images=(image,), max_tokens=tokens, temperature=1.0, seed=i,
                                  banned_token_ids=None) for i in range(k)]

    async def many():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    started = time.monotonic()
    results = asyncio.run(many())
    elapsed = time.monotonic() - started
    generated = sum(len(r.token_ids) for r in results)
    return {"seconds": round(elapsed, 3), "tokens": generated, "tokens_per_s": round(generated / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--k", type=int, default=8, help="concurrent requests")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--http", action="store_true", help="also start a vLLM server and time it")
    args = parser.parse_args()

    from axpo_rllm.engines import GenerationRequest, TransformersEngine
    from axpo_rllm.demo.tiny_model import build_tiny_qwen_vl, tiny_model_dir

    report: dict = {"load_avg_1m": os.getloadavg()[0], "family": args.family}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        build_tiny_qwen_vl(tmp, family=args.family)
        report["tiny_model_build_s"] = round(time.monotonic() - started, 2)
    path = tiny_model_dir(args.family)
    image = _image(0)

    started = time.monotonic()
    hf = TransformersEngine(path)
    report["transformers_start_s"] = round(time.monotonic() - started, 2)
    prompt = _prompt(hf.tokenizer)
    report["transformers"] = _throughput(hf, prompt, image, args.k, args.tokens)
    greedy = GenerationRequest(prompt_ids=prompt, images=(image,), max_tokens=args.tokens, temperature=0.0)
    reference = asyncio.run(hf.generate(greedy))

    if importlib.util.find_spec("vllm") is not None:
        from axpo_rllm.engines import VLLMEngine

        started = time.monotonic()
        vl = VLLMEngine(path)
        report["vllm_start_s"] = round(time.monotonic() - started, 2)
        report["vllm"] = _throughput(vl, prompt, image, args.k, args.tokens)
        ours = asyncio.run(vl.generate(greedy))
        report["greedy_tokens_equal"] = ours.token_ids == reference.token_ids
        report["logprob_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours.logprobs, reference.logprobs))
        if args.http:
            from axpo_rllm.engines import HTTPEngine, VLLMServer

            with VLLMServer(path, extra_args=["--distributed-executor-backend", "uni"]) as server:
                report["http_server_start_s"] = round(server.start_seconds, 1)
                http = HTTPEngine.for_model(server.base_url, path)
                report["http"] = _throughput(http, prompt, image, args.k, args.tokens)
                served = asyncio.run(http.generate(greedy))
                report["http_equals_offline"] = served.token_ids == ours.token_ids and served.logprobs == ours.logprobs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

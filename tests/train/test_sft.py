"""SFT: teacher trajectories are token-exact with the agent's rendering, and training lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest

from axpo_rllm.demo.teacher import teacher_trajectories
from axpo_rllm.train.sft import SFTConfig, eval_loss, tokenize_trajectory, tokenizer_corpus, train_sft

SYSTEM = "You are a helpful assistant."


@pytest.fixture()
def trajectories(world, make_env):
    return teacher_trajectories(world.tasks(2, "train", families=["color", "code"]) + world.tasks(2, "train", families=["search", "crop"]), make_env())


def test_teacher_calls_a_tool_exactly_on_tool_families(trajectories):
    assert [t.uses_tool for t in trajectories] == [False, True, True, True]
    for t in trajectories:
        assert t.turns[-1].endswith(f"\\boxed{{{t.task.answer}}}")
        assert len(t.turns) == len(t.observations) + 1


def test_tokens_match_the_agents_rendering(trajectories, chat, make_env):
    env = make_env()
    schemas = env.tool_schemas()
    eos = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for traj in trajectories:
        ex = tokenize_trajectory(traj, chat, schemas, SYSTEM)
        assert list(ex.prompt_ids) == chat.prompt_ids(traj.task, schemas, SYSTEM)
        ids, mask = list(ex.response_ids), list(ex.loss_mask)
        # The answer turn's closing <|im_end|> is trained (a model that never learns it never stops).
        assert ids[-1] == eos and mask[-1] == 1
        n_pads = sum(t == chat.image_pad_id for t in list(ex.prompt_ids) + ids)
        assert n_pads == len(ex.images)
        if traj.uses_tool:
            # The call turn ends with its trained <|im_end|> right after </tool_call> (the agent's turns
            # run to end-of-turn); the observation is context.
            close = ids.index(chat.call_close_id) + 1
            assert ids[close] == eos and mask[: close + 1] == [1] * (close + 1)
            obs = chat.observation_ids([(traj.observations[0][0], len(traj.observations[0][1]))], ids[close])
            assert ids[close + 1 : close + 1 + len(obs)] == obs
            assert set(mask[close + 1 : close + 1 + len(obs)]) == {0}
            assert set(mask[close + 1 + len(obs) :]) == {1}
            assert chat.decode(ids[: close + 1]).startswith("<think>")
        else:
            assert set(mask) == {1}
        corpus = tokenizer_corpus([traj], chat, schemas, SYSTEM)[0]
        assert traj.task.question in corpus and "<|im_start|>" not in corpus


def test_sft_lowers_the_teacher_loss(trajectories, chat, policy, make_env):
    schemas = make_env().tool_schemas()
    examples = [tokenize_trajectory(t, chat, schemas, SYSTEM) for t in trajectories]
    before = eval_loss(policy, examples)
    history = train_sft(policy, examples, SFTConfig(max_steps=6, minutes=2.0, batch_size=4, lr=3e-3, log_every=1))
    after = eval_loss(policy, examples)
    assert len(history) == 6 and np.isfinite([h["loss"] for h in history]).all()
    assert after < before - 0.5, (before, after)
    assert not policy.model.training  # handed back in eval mode, ready for the engine


def test_first_turn_stats_reads_well_formed_turns(chat, make_env, world):
    """A fake engine that replays the teacher's first turn is 100% well-formed."""
    from axpo_rllm.engines.base import GenerationResult
    from axpo_rllm.train.sft import first_turn_stats

    env = make_env()
    tasks = world.tasks(4, "eval", families=["color", "code"])
    eos = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = {}
    for traj in teacher_trajectories(tasks, make_env()):
        ids = chat.encode(traj.turns[0]) + ([] if traj.uses_tool else [eos])
        first[tuple(chat.prompt_ids(traj.task, env.tool_schemas(), SYSTEM))] = ids

    class Replay:
        async def generate(self, request):
            ids = first[tuple(request.prompt_ids)]
            return GenerationResult(ids, [-0.1] * len(ids), "stop")

    stats = first_turn_stats(Replay(), chat, tasks, env.tool_schemas(), env.tool_names, SYSTEM)
    assert stats["well_formed"] == 1.0 and stats["tool_call_share"] == 0.5

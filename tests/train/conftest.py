"""Fixtures for the training-pipeline tests: the synthetic world, live tools, a tiny model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _modest_threads():
    # The suite shares small CPU machines: one torch thread in these tests, restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world():
    from axpo_rllm.demo.world import SyntheticWorld

    return SyntheticWorld(seed=3, n_facts=40)


@pytest.fixture(scope="session")
def tools(world):
    """Crop, python and search tools; search against a live local BM25 server over the world's corpus."""
    from world_tools import world_tools

    with world_tools(world, top_k=2) as built:
        yield built


@pytest.fixture(scope="session")
def make_env(tools):
    from axpo_rllm.envs.env import MultimodalToolEnv

    return lambda grader=None: MultimodalToolEnv(tools=tools, grader=grader)


@pytest.fixture()
def engine(model_dir):
    from axpo_rllm.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(model_dir)
    yield eng
    eng.close()


@pytest.fixture()
def chat(engine):
    from axpo_rllm.agents.agent import ChatFormat

    return ChatFormat(engine.tokenizer)


@pytest.fixture()
def policy(engine):
    from axpo_rllm.train.actor import Policy

    return Policy(engine.model, engine.image_processor, engine.tokenizer.pad_token_id)

"""The rllm adapter: plain-Python parts always; the BaseEnv / Tool classes only where rllm is installed."""

from __future__ import annotations

import asyncio
import sys

import pytest
from PIL import Image

from axpo_rllm.envs.adapters import rllm as rllm_adapter
from axpo_rllm.envs.adapters.rllm import ParsedCall, parse_action, task_from_dict
from axpo_rllm.envs.search_server import BM25Index, RetrievalServer
from axpo_rllm.envs.tools.base import ToolContext
from axpo_rllm.core.records import Task
from axpo_rllm.demo.facts import make_fact_corpus


def image(w=200, h=100):
    return Image.new("RGB", (w, h), (10, 200, 30))


# ---------------------------------------------------------------------------------------------
# Without rllm


def test_task_from_dict_spellings_and_metadata():
    img = image()
    task = task_from_dict({"uid": "q7", "prompt": "How many?", "ground_truth": 3, "data_source": "numeric", "image": img, "rel_tol": 0.05, "tools": ["crop"]})
    assert task == Task(task_id="q7", question="How many?", answer="3", data_source="numeric", images=(img,), metadata={"rel_tol": 0.05})
    assert task_from_dict({"task_id": "a", "question": "q", "answer": "x", "data_source": "qa", "images": [img, img], "metadata": {"k": 1}}).images == (img, img)
    with pytest.raises(KeyError, match="'data_source'"):
        task_from_dict({"task_id": "a", "question": "q", "answer": "x"})


def test_task_from_dict_decodes_image_references_and_drops_none(tmp_path):
    import io

    buf = io.BytesIO()
    image(30, 20).save(buf, format="PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    row = {"task_id": "r", "question": "q", "ground_truth": "A", "data_source": "choice", "rel_tol": None,
           "images": [buf.getvalue(), {"bytes": buf.getvalue(), "path": ""}, {"bytes": None, "path": str(tmp_path / "x.png")}],
           "metadata": {"choices": ["a", "b"], "abs_tol": None}}
    task = task_from_dict(row)  # as rllm's registry / verl's parquet hand rows back
    assert [im.size for im in task.images] == [(30, 20)] * 3
    assert task.metadata == {"choices": ["a", "b"]}  # absent (None) keys leave the verifier's defaults alone
    with pytest.raises(ValueError, match="task 'r': image file not found"):
        task_from_dict({**row, "images": [str(tmp_path / "gone.png")]})


class RllmLikeToolCall:
    def __init__(self, name, arguments):
        self.name, self.arguments = name, arguments


@pytest.mark.parametrize(
    "action, expected",
    [
        ("final \\boxed{3}", "final \\boxed{3}"),
        ({"final_answer": "x"}, "x"),
        ({"name": "crop", "arguments": {"bbox": [1, 2, 3, 4]}}, [ParsedCall("crop", {"bbox": [1, 2, 3, 4]})]),
        ([{"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"query": "q"}'}}], [ParsedCall("search", '{"query": "q"}', "c1")]),
        ({"tool_calls": [RllmLikeToolCall("crop", {})]}, [ParsedCall("crop", {})]),
        ({"tool_calls": None}, []),
    ],
)
def test_parse_action(action, expected):
    assert parse_action(action) == expected


def test_parse_action_rejects_garbage():
    with pytest.raises(TypeError, match="int"):
        parse_action(42)


def test_clear_import_error_without_rllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "rllm", None)  # makes `import rllm...` fail even where rllm exists
    monkeypatch.setitem(sys.modules, "rllm.environments.base.base_env", None)
    monkeypatch.setitem(sys.modules, "rllm.tools.tool_base", None)
    rllm_adapter._env_class.cache_clear()
    try:
        with pytest.raises(ImportError, match="needs rllm"):
            from axpo_rllm.envs.adapters.rllm import AXPOToolEnv  # noqa: F401
        with pytest.raises(ImportError, match="needs rllm"):
            rllm_adapter.rllm_tool_map(["crop"])
        assert not rllm_adapter.rllm_available()
    finally:
        rllm_adapter._env_class.cache_clear()


# ---------------------------------------------------------------------------------------------
# With rllm


@pytest.fixture
def rllm():
    return pytest.importorskip("rllm")


@pytest.fixture(scope="module")
def corpus():
    docs, qa = make_fact_corpus(40, seed=5)
    with RetrievalServer(BM25Index(docs)) as server:
        yield server, qa


@pytest.mark.rllm
def test_env_is_an_rllm_base_env(rllm):
    from rllm.environments.base.base_env import BaseEnv

    from axpo_rllm.envs.adapters.rllm import AXPOToolEnv

    assert issubclass(AXPOToolEnv, BaseEnv) and AXPOToolEnv.is_multithread_safe()


@pytest.mark.rllm
def test_episode_through_the_rllm_env(rllm, corpus):
    from axpo_rllm.envs.adapters.rllm import AXPOToolEnv

    server, qa = corpus
    question, answer = qa[0]
    env = AXPOToolEnv.from_dict(
        {"tools": ["crop", "search"], "tool_configs": {"search": {"base_url": server.url}}, "uid": "q1", "question": question,
         "answer": answer, "data_source": "search_qa", "image": image()}
    )
    obs, info = env.reset()
    assert obs["question"] == question and len(obs["images"]) == 1 and info["tools"] == ["crop", "search"]

    calls = [
        {"id": "a", "function": {"name": "search", "arguments": f'{{"query": "{question}"}}'}},
        {"id": "b", "function": {"name": "crop", "arguments": {"bbox": [0, 0, 500, 500]}}},
        {"id": "c", "function": {"name": "nope", "arguments": {}}},
    ]
    obs, reward, done, info = env.step(calls)
    assert (reward, done) == (0.0, False)
    search_out, crop_out, bad_out = obs["tool_outputs"]
    assert answer in search_out["text"] and search_out["call_id"] == "a"
    assert crop_out["image_indices"] == [1] and len(obs["images"]) == 1 and obs["images"][0].size == (100, 50)
    assert bad_out["text"].startswith("Error: unknown tool")
    assert info["tool_calls"] == 3 and info["tool_errors"] == 1

    obs, reward, done, info = env.step(f"<think>found it</think>\\boxed{{{answer}}}")
    assert (obs, reward, done) == ({}, 1.0, True) and info["correct"] and info["grader_failure"] is None
    env.close()


@pytest.mark.rllm
def test_rllm_tools_in_multitool(rllm, corpus):
    from rllm.tools.multi_tool import MultiTool
    from rllm.tools.tool_base import ToolOutput

    server, qa = corpus
    multi = MultiTool(tool_map=rllm_adapter.rllm_tool_map(["crop", "search"], configs={"search": {"base_url": server.url}}))
    assert [t["function"]["name"] for t in multi.json] == ["crop", "search"]

    out = asyncio.run(multi.tool_map["search"](query=qa[2][0], use_async=True))
    assert isinstance(out, ToolOutput) and out.name == "search" and qa[2][1] in out.output and out.error is None

    crop = multi.tool_map["crop"].forward(context=ToolContext(images=(image(),)), bbox=[0, 0, 1000, 1000])
    assert crop.error is None and crop.metadata["images"][0].size == (200, 100)

    bad = multi.tool_map["crop"].forward(context=ToolContext(images=(image(),)), bbox=[5, 5, 5, 1])  # no area (an inverted box is reordered, issue 10)
    assert bad.error and str(bad).startswith("Error: ")


@pytest.mark.rllm
def test_rllm_workflow_accepts_the_env(rllm, corpus):
    """rllm's Workflow asserts is_multithread_safe() over its BaseEnv attributes and runs env calls in an executor."""
    from concurrent.futures import ThreadPoolExecutor

    from rllm.workflows.workflow import Workflow

    from axpo_rllm.envs.adapters.rllm import AXPOToolEnv

    server, qa = corpus

    class ScriptedWorkflow(Workflow):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.env = AXPOToolEnv(tools=["search"], tool_configs={"search": {"base_url": server.url}})

        async def run(self, task, uid, **kwargs):
            await self.run_in_executor(self.reset, task=task, uid=uid)  # rllm's own reset finds our env
            obs, *_ = await self.run_in_executor(self.env.step, [{"name": "search", "arguments": {"query": task["question"]}}])
            return await self.run_in_executor(self.env.step, f"\\boxed{{{task['answer']}}}")

    workflow = ScriptedWorkflow(rollout_engine=None, executor=ThreadPoolExecutor(4))
    assert workflow.is_multithread_safe()
    tasks = [{"uid": f"q{i}", "question": q, "answer": a, "data_source": "search_qa"} for i, (q, a) in enumerate(qa[:4])]

    async def run_all():
        return [await workflow.run(t, t["uid"]) for t in tasks]

    results = asyncio.run(run_all())
    assert [r[1] for r in results] == [1.0] * 4

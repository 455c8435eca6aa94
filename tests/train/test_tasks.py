"""Synthetic tasks: deterministic, well-formed, and solvable by the teacher with the real tools."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from axpo_rllm.envs.verifiers import Grader, get_verifier
from axpo_rllm.core.records import Task
from axpo_rllm.demo.world import DEFAULT_MIX, FAMILIES, TOOL_OF_FAMILY, SyntheticWorld


def fingerprint(task: Task):
    return (task.task_id, task.question, task.answer, task.data_source,
            tuple(np.asarray(im).tobytes() for im in task.images), repr(task.metadata["teacher"]))


def test_same_seed_same_tasks_images_included():
    a, b = SyntheticWorld(seed=7, n_facts=30), SyntheticWorld(seed=7, n_facts=30)
    assert [fingerprint(t) for t in a.tasks(40)] == [fingerprint(t) for t in b.tasks(40)]
    assert [fingerprint(t) for t in a.tasks(10, "eval")] == [fingerprint(t) for t in b.tasks(10, "eval")]


def test_other_seed_other_tasks():
    a, b = SyntheticWorld(seed=1, n_facts=30), SyntheticWorld(seed=2, n_facts=30)
    assert [fingerprint(t) for t in a.tasks(20)] != [fingerprint(t) for t in b.tasks(20)]


def test_a_task_depends_only_on_its_index_not_on_the_batch():
    w = SyntheticWorld(seed=0, n_facts=30)
    assert fingerprint(w.tasks(5)[3]) == fingerprint(w.tasks(50)[3])


def test_records_are_complete_and_ids_unique(world):
    tasks = world.tasks(200)
    assert len({t.task_id for t in tasks}) == len(tasks)
    for t in tasks:
        assert ":" not in t.task_id and t.images and t.answer
        get_verifier(t.data_source)  # a verifier exists for every data source
        family = t.metadata["family"]
        teacher = t.metadata["teacher"]
        assert (teacher is not None) == (family in TOOL_OF_FAMILY)
        if teacher:
            assert teacher["name"] == TOOL_OF_FAMILY[family]


def test_mix_is_three_quarters_direct(world):
    counts = Counter(t.metadata["family"] for t in world.tasks(2000))
    tool_share = sum(counts[f] for f in TOOL_OF_FAMILY) / 2000
    assert abs(tool_share - sum(DEFAULT_MIX[f] for f in TOOL_OF_FAMILY)) < 0.04
    assert set(counts) == set(FAMILIES)


def test_train_and_eval_ask_about_disjoint_facts(world):
    train = {t.question for t in world.tasks(300, "train", families=["search"])}
    evals = {t.question for t in world.tasks(300, "eval", families=["search"])}
    assert train and evals and not train & evals


def test_unknown_family_or_split_is_refused(world):
    with pytest.raises(ValueError, match="family"):
        world.make("digits", "train", 0)
    with pytest.raises(ValueError, match="split"):
        world.tasks(1, "test")
    with pytest.raises(ValueError, match="mix"):
        SyntheticWorld(mix={"digits": 1.0})


def test_visual_attributes_are_in_the_pixels(world):
    """The answer of a direct task is readable from coarse pixels (what a tiny vision tower can learn)."""
    from axpo_rllm.demo.world import BACKGROUND, COLORS

    for t in world.tasks(12, families=["color", "position", "size"]):
        pixels = np.asarray(t.images[0]).reshape(-1, 3)
        shape = pixels[(pixels != BACKGROUND).any(axis=1)]
        fam = t.metadata["family"]
        if fam == "color":
            assert (shape == COLORS[t.answer]).all(axis=1).mean() > 0.9
        elif fam == "position":
            xs = np.nonzero((np.asarray(t.images[0]) != BACKGROUND).any(axis=2))[1]
            assert (xs.mean() < 56) == (t.answer == "left")
        else:
            assert (len(shape) > 1500) == (t.answer == "large")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_teacher_is_verified_correct_with_the_real_tools(world, make_env, family):
    """Every task is solvable: the teacher's tool call (if any) hands back what the answer needs,
    and the teacher's final answer passes the task's own verifier."""
    grader = Grader()
    for task in world.tasks(3, "eval", families=[family]):
        env = make_env(grader)
        env.reset(task)
        teacher = task.metadata["teacher"]
        if teacher:
            obs = env.call_tool(teacher["name"], teacher["arguments"])
            assert not obs.is_error, obs.model_text
            if family in ("code", "search"):
                assert task.answer in obs.model_text  # the answer comes back as text
            else:
                assert len(obs.images) == 1
        verdict = env.finish(f"<think>\nok\n</think>\n\\boxed{{{task.answer}}}")
        assert verdict.correct and verdict.reward == 1.0
        env.reset(task)
        assert not env.finish("<think>\nok\n</think>\n\\boxed{purple}").correct


def test_tool_use_is_the_teachers_choice_and_the_crop_box_matters(world, make_env):
    """With ``direct_share`` the teacher answers some tool-family tasks without the tool (per task,
    deterministic); its jittered crop boxes still show the asked corner's colour, and the box over
    another corner shows a different square (the call's content decides the answer)."""
    from axpo_rllm.demo.teacher import teacher_trajectories
    from axpo_rllm.demo.world import COLORS, QUADRANTS

    tasks = world.tasks(40, "train", families=["code", "search", "crop"])
    env = make_env()
    trajs = teacher_trajectories(tasks, env, direct_share=0.4)
    direct = [t for t in trajs if not t.uses_tool]
    assert 0.15 < len(direct) / len(trajs) < 0.65
    assert all(f"\\boxed{{{t.task.answer}}}" in t.turns[-1] for t in trajs)
    assert [t.uses_tool for t in teacher_trajectories(tasks, env, direct_share=0.4)] == [t.uses_tool for t in trajs]
    assert all(t.uses_tool for t in teacher_trajectories(tasks, env))  # direct_share 0: the old teacher

    def has(image, color):
        target = COLORS[color]
        return any(px == target for px in image.convert("RGB").getdata())

    boxes = set()
    for t in trajs:
        if t.uses_tool and t.task.metadata["family"] == "crop":
            (text, images), = t.observations
            assert has(images[0], t.task.answer)
            boxes.add(t.turns[0].split('"bbox": ')[1].split("]")[0])
            where = next(q for q in QUADRANTS if q in t.task.question)
            other = next(q for q in QUADRANTS if q != where)
            env.reset(t.task)
            obs = env.call_tool("crop", {"image_index": 0, "bbox": list(QUADRANTS[other])})
            colors = {c for c in COLORS if has(obs.images[0], c)}
            assert len(colors) == 1  # one square: the other corner's
    assert len(boxes) > 1  # the call's content varies across demonstrations

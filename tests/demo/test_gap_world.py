"""The gap world's recovery chain is what the world claims (a scaled-down world, the real tools).

Links: every tool task has SLOTS candidate calls and exactly one right one, so a random call is
right one time in SLOTS; the right call's observation makes the answer readable (and a wrong
call's shows another colour); a direct answer is one of four colours, drawn uniformly; the
teacher's calls are right at its configured share and it answers what the observation shows.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from axpo_rllm.demo.gap_world import SLOTS, GapWorld
from axpo_rllm.demo.world import BACKGROUND, COLORS, QUADRANTS, TOOL_OF_FAMILY

TOOL_FAMILIES = tuple(TOOL_OF_FAMILY)


@pytest.fixture(scope="module")
def gap_world():
    return GapWorld(seed=5, n_facts=40)


@pytest.fixture(scope="module")
def gap_env(gap_world):
    """The real crop, python and search tools; search on a live BM25 server over the world's flags."""
    from axpo_rllm.envs.env import MultimodalToolEnv
    from world_tools import world_tools

    with world_tools(gap_world, top_k=1, python={"min_isolation": "rlimits", "private_uid": False}) as tools:
        yield lambda: MultimodalToolEnv(tools=tools)


def shown_colors(obs) -> set[str]:
    """The colours an observation shows: named in its text, or painted in its image."""
    if obs.images:
        pixels = np.asarray(obs.images[0].convert("RGB")).reshape(-1, 3)
        return {name for name, rgb in COLORS.items() if (pixels == rgb).all(axis=1).any()}
    text = obs.model_text
    return {name for name, rgb in COLORS.items() if name in text or str(tuple(rgb)) in text}


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_the_right_call_shows_the_answer_and_a_wrong_call_another_colour(gap_world, gap_env, family):
    env = gap_env()
    for task in gap_world.tasks(4, "eval", families=[family]):
        meta = task.metadata
        assert len(meta["calls"]) == SLOTS and task.answer == meta["shows"][meta["right"]]
        for slot, call in enumerate(meta["calls"]):
            env.reset(task)
            obs = env.call_tool(call["name"], call["arguments"])
            assert not obs.is_error, obs.model_text
            assert shown_colors(obs) == {meta["shows"][slot]}  # one colour, readable off the observation
            assert gap_world.slot_of_call(task, call["name"], call["arguments"]) == slot
            assert gap_world.call_is_right(task, call["name"], call["arguments"]) == (slot == meta["right"])
            assert (meta["shows"][slot] == task.answer) == (slot == meta["right"])


def test_a_random_call_is_right_one_time_in_slots(gap_world):
    tasks = [t for f in TOOL_FAMILIES for t in gap_world.tasks(60, "train", families=[f])]
    rng = random.Random(0)
    draws = [(t, rng.randrange(SLOTS)) for t in tasks for _ in range(8)]
    right = [gap_world.call_is_right(t, t.metadata["calls"][s]["name"], t.metadata["calls"][s]["arguments"])
             for t, s in draws]
    # exactly one right candidate per task, so a uniform draw is right with probability 1/SLOTS
    assert all(sum(gap_world.call_is_right(t, c["name"], c["arguments"]) for c in t.metadata["calls"]) == 1
               for t in tasks)
    assert abs(sum(right) / len(right) - 1 / SLOTS) < 0.03  # 1440 draws: 3 standard errors ~ 0.034


def test_calls_that_show_several_squares_or_countries_are_not_right(gap_world):
    crop = gap_world.make("crop", "train", 0)
    assert gap_world.slot_of_call(crop, "crop", {"bbox": [0, 0, 1000, 1000]}) is None  # the whole image
    assert gap_world.slot_of_call(crop, "python", {"bbox": list(QUADRANTS["top-left"])}) is None  # wrong tool
    code = gap_world.make("code", "train", 0)
    assert gap_world.slot_of_call(code, "python", {"code": "print(images[0].getpixel((112, 112)))"}) is None
    assert gap_world.slot_of_call(code, "python", {"code": "print(images[0].size)"}) is None
    search = gap_world.make("search", "train", 0)
    a, b = search.metadata["countries"][:2]
    assert gap_world.slot_of_call(search, "search", {"query": f"flag of {a} and {b}"}) is None
    assert gap_world.slot_of_call(search, "search", {"query": f"the flag of {b.upper()}"}) == 1


def test_a_direct_answer_is_a_guess_among_four_colours(gap_world):
    """Answers are uniform over the four colours (the best constant guess is right about 1/4 of the
    time); the asked square is a small part of the image; the asked country's colour is not in the question."""
    tasks = [t for f in TOOL_FAMILIES for t in gap_world.tasks(200, "train", families=[f])]
    counts = Counter(t.answer for t in tasks)
    assert set(counts) == set(COLORS) and max(counts.values()) / len(tasks) < 0.29
    for t in tasks:
        if t.metadata["family"] == "search":
            assert not any(c in t.question for c in COLORS)
        else:
            pixels = np.asarray(t.images[0]).reshape(-1, 3)
            share = (pixels == COLORS[t.answer]).all(axis=1).mean()
            assert 0.03 < share < 0.06 and (pixels != BACKGROUND).any(axis=1).mean() < 0.2


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_the_teachers_calls_are_right_at_its_share_and_it_reads_what_it_sees(gap_world, gap_env, share):
    from axpo_rllm.demo.teacher import teacher_trajectories

    tasks = [t for f in TOOL_FAMILIES for t in gap_world.tasks(40, "train", families=[f])]
    trajs = [t for t in teacher_trajectories(tasks, gap_env(), direct_share=0.0, right_call_share=share)]
    right = 0
    for traj in trajs:
        meta = traj.task.metadata
        call = json.loads(traj.turns[0].split("<tool_call>")[1].split("</tool_call>")[0])
        slot = meta["calls"].index(call)
        right += slot == meta["right"]
        assert f"\\boxed{{{meta['shows'][slot]}}}" in traj.turns[-1]  # the answer its observation shows
    if share == 1.0:
        assert right == len(trajs)
    else:
        assert abs(right / len(trajs) - share) < 0.09  # 120 tasks: 2 standard errors ~ 0.084


def test_one_asked_quadrant_makes_one_right_call_for_every_question():
    """The job's world asks every code question about one quadrant: the right call is the same
    snippet for every question (still one of four candidates), the answers still one of four
    colours; an unknown quadrant is refused."""
    world = GapWorld(seed=5, n_facts=40, asked=["top-left"])
    tasks = world.tasks(80, "train", families=["code"]) + world.tasks(40, "eval", families=["code"])
    right_calls = {json.dumps(t.metadata["calls"][t.metadata["right"]], sort_keys=True) for t in tasks}
    assert len(right_calls) == 1 and all(len(t.metadata["calls"]) == SLOTS for t in tasks)
    assert all("top-left" in t.question for t in tasks) and set(Counter(t.answer for t in tasks)) == set(COLORS)
    assert len({json.dumps(t.metadata["calls"][t.metadata["right"]]) for t in GapWorld(seed=5, n_facts=40)
                .tasks(80, "train", families=["code"])}) == SLOTS  # the default asks all four
    with pytest.raises(ValueError, match="asked must list quadrants"):
        GapWorld(seed=5, n_facts=40, asked=["middle"])


def test_the_teacher_guesses_when_it_answers_a_tool_task_without_its_tool(gap_world, gap_env):
    """Direct demonstrations of a candidate-call task name one of the shown colours at random, so
    SFT never teaches reading the answer off the image; the direct families keep the truth."""
    from axpo_rllm.demo.teacher import teacher_trajectories

    tasks = gap_world.tasks(200, "train", families=["code"])
    trajs = teacher_trajectories(tasks, gap_env(), direct_share=1.0)
    answers = [t.turns[-1].split("\\boxed{")[1].rstrip("}") for t in trajs]
    assert all(not t.observations and a in t.task.metadata["shows"] for t, a in zip(trajs, answers))
    right = sum(a == t.task.answer for t, a in zip(trajs, answers)) / len(trajs)
    assert abs(right - 1 / SLOTS) < 0.09  # 200 tasks: 3 standard errors ~ 0.092
    color = teacher_trajectories(gap_world.tasks(20, "train", families=["color"]), gap_env(), direct_share=1.0)
    assert all(f"\\boxed{{{t.task.answer}}}" in t.turns[-1] for t in color)

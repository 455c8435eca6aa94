"""A synthetic world built to have the thinking–acting gap (the embedded job's default world).

The direct families (colour, position, size) are :class:`~axpo_rllm.demo.world.SyntheticWorld`'s.
The three tool families are redesigned so that each link of AXPO's recovery chain is what the
world says it is:

======== ============================================================ ======================
family   question (4 candidate calls, exactly one right)              the call's observation
======== ============================================================ ======================
crop     What color is the square in the top-left corner?             the quadrant's square
code     Use code: what color is the middle of the top-left square?   its pixel's RGB, as text
search   A, B, C and D each have a flag. What color is the flag of C? "The flag of C is red."
======== ============================================================ ======================

* **The right call is a real choice.** Every tool task lists four candidate calls in
  ``metadata["calls"]`` (one crop box per quadrant, one pixel per square, one query per named
  country); exactly one, ``metadata["right"]``, shows the asked square or country. A call drawn
  at random is right one time in four (:data:`SLOTS`).
* **A right call makes the answer easy to read.** The right call's observation is the answer:
  the asked square alone (a 48 px square filling a fifth of the crop), its colour's RGB triple,
  or the sentence that names it. A wrong call shows another of the four colours (the four squares,
  and the four flags of a question, all differ), so it leads to a wrong answer.
* **A direct answer is a poor guess.** Answers are one of four colours, uniformly; the squares are
  small in the whole image and the flags are made up, so a policy answering without the tool is
  right about one time in four.

``metadata["shows"]`` holds what each candidate call's observation shows (the teacher of
:mod:`axpo_rllm.demo.teacher` answers from it). :meth:`GapWorld.slot_of_call` maps any call a
policy makes to the candidate it amounts to (or None), :meth:`GapWorld.call_is_right` says whether
it is the right one: the diagnosis (:mod:`axpo_rllm.demo.diagnose`) reads P(right call | prefix)
with them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw

from axpo_rllm.demo.facts import make_flag_corpus
from axpo_rllm.demo.world import BACKGROUND, COLORS, QUADRANTS, SyntheticWorld
from axpo_rllm.core.records import Task
from axpo_rllm.envs.search_server import Document

__all__ = ["GapWorld", "SLOTS", "SQUARE", "IMAGE_SIDE", "WORLDS", "make_world"]

SLOTS = 4
"""Candidate calls per tool task (one right): a random call is right with probability 1/SLOTS."""
IMAGE_SIDE = 224
SQUARE = 48
"""Side of each coloured square in pixels (about 5% of the image, about 18% of a quadrant's crop)."""
JITTER = 6
"""A square's centre moves up to this many pixels from its nominal centre (it stays in its quadrant)."""
MAX_FLAG_BLOCKS = 28
_PIXEL_CALL = re.compile(r"getpixel\(\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*\)")


def _quadrant_center(where: str) -> tuple[int, int]:
    """Where a quadrant's square is centred: 60 or 160 px on each axis. Numbers are one token a
    digit for the tokenizer, so the four candidate pixels differ only by a leading 1 ("60" vs
    "160"): a choice a tiny model can write without garbling the digits."""
    x1, y1, _, _ = QUADRANTS[where]
    return (60 if x1 == 0 else 160), (60 if y1 == 0 else 160)


@dataclass
class GapWorld(SyntheticWorld):
    """:class:`SyntheticWorld` with the tool families above (same API, same determinism).

    ``asked``: the quadrants the crop and code questions ask about (default: all four, drawn per
    question). With one quadrant the right call is the same for every question, so RL finds it
    from the rewards alone; with four it must also learn which call answers which question.
    """

    asked: Sequence[str] = tuple(QUADRANTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.asked = tuple(self.asked)
        if not self.asked or any(q not in QUADRANTS for q in self.asked):
            raise ValueError(f"asked must list quadrants of {list(QUADRANTS)}, got {list(self.asked)}")
        # Short names (two syllables: a tiny model can copy them into a query), one block of SLOTS
        # countries per question group: n_facts // 8 blocks, at most 28 (the two-syllable names
        # run out), half of them train, half eval.
        blocks = max(2, min(self.n_facts // (2 * SLOTS), MAX_FLAG_BLOCKS))
        self.flag_documents, self.flag_blocks = make_flag_corpus(blocks, SLOTS, seed=self.seed, syllables=2)

    @property
    def corpus(self) -> list[Document]:
        return list(self.flag_documents)

    # -- the four squares (crop and code) -----------------------------------------------------

    def _squares(self, rng: random.Random) -> tuple[Image.Image, dict[str, str], dict[str, tuple[int, int]]]:
        image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        colors = dict(zip(QUADRANTS, rng.sample(list(COLORS), SLOTS)))
        centers = {}
        for where in QUADRANTS:
            qx, qy = _quadrant_center(where)
            cx, cy = qx + rng.randint(-JITTER, JITTER), qy + rng.randint(-JITTER, JITTER)
            centers[where] = (cx, cy)
            half = SQUARE // 2
            draw.rectangle((cx - half, cy - half, cx + half - 1, cy + half - 1), fill=COLORS[colors[where]])
        return image, colors, centers

    def _crop(self, rng: random.Random, split: str, index: int):
        image, colors, centers = self._squares(rng)
        where = rng.choice(self.asked)
        calls = [{"name": "crop", "arguments": {"image_index": 0, "bbox": list(box)}} for box in QUADRANTS.values()]
        meta = self._slots(calls, [colors[q] for q in QUADRANTS], list(QUADRANTS).index(where))
        meta["centers"] = [list(centers[q]) for q in QUADRANTS]
        return f"What color is the square in the {where} corner?", colors[where], "search_qa", [image], calls[meta["right"]], meta

    def _code(self, rng: random.Random, split: str, index: int):
        image, colors, centers = self._squares(rng)
        where = rng.choice(self.asked)
        # The candidate code reads the quadrant's centre pixel, inside its square whatever the jitter.
        calls = [{"name": "python", "arguments": {"code": "print(images[0].getpixel((%d, %d)))" % _quadrant_center(q)}}
                 for q in QUADRANTS]
        meta = self._slots(calls, [colors[q] for q in QUADRANTS], list(QUADRANTS).index(where))
        meta["centers"] = [list(centers[q]) for q in QUADRANTS]
        question = f"Use code: what color is the middle of the {where} square?"
        return question, colors[where], "search_qa", [image], calls[meta["right"]], meta

    def _search(self, rng: random.Random, split: str, index: int):
        half = len(self.flag_blocks) // 2
        pool = self.flag_blocks[:half] if split == "train" else self.flag_blocks[half:]
        block = pool[index % len(pool)]  # [(country, colour), ...] with four different colours
        countries = [country for country, _ in block]
        right = rng.randrange(SLOTS)
        calls = [{"name": "search", "arguments": {"query": f"flag of {country}"}} for country in countries]
        meta = self._slots(calls, [color for _, color in block], right)
        meta["countries"] = countries
        listed = ", ".join(countries[:-1]) + f" and {countries[-1]}"
        question = f"{listed} each have a flag. What color is the flag of {countries[right]}?"
        image = Image.new("RGB", (56, 56), COLORS[rng.choice(list(COLORS))])  # every prompt has an image
        return question, block[right][1], "search_qa", [image], calls[right], meta

    @staticmethod
    def _slots(calls: list[dict], shows: list[str], right: int) -> dict[str, Any]:
        if len(calls) != SLOTS or len(set(shows)) != SLOTS:
            raise AssertionError(f"a tool task needs {SLOTS} candidate calls showing different answers, got {shows}")
        return {"calls": calls, "shows": shows, "right": right}

    # -- reading a policy's call ----------------------------------------------------------------

    def slot_of_call(self, task: Task, name: str, arguments: Mapping[str, Any]) -> int | None:
        """Which candidate call of ``task`` the call ``name(arguments)`` amounts to (its observation
        shows that candidate's square or country alone), or None (a wrong tool, several squares or
        none, a query naming no or several countries, code that reads no square)."""
        family = str(task.metadata["family"])
        if "calls" not in task.metadata or name != task.metadata["calls"][0]["name"] or not isinstance(arguments, Mapping):
            return None
        if family == "crop":
            return self._slot_of_box(task, arguments.get("bbox"))
        if family == "code":
            match = _PIXEL_CALL.search(str(arguments.get("code", "")))
            if match is None:
                return None
            x, y = int(match.group(1)), int(match.group(2))
            hits = [i for i, (cx, cy) in enumerate(task.metadata["centers"])
                    if abs(x - cx) < SQUARE // 2 and abs(y - cy) < SQUARE // 2]
            return hits[0] if len(hits) == 1 else None
        if family == "search":
            words = set(re.findall(r"\w+", str(arguments.get("query", "")).lower()))
            hits = [i for i, c in enumerate(task.metadata["countries"]) if c.lower() in words]
            return hits[0] if len(hits) == 1 else None
        return None

    @staticmethod
    def _slot_of_box(task: Task, box: Any) -> int | None:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            return None
        x1, y1, x2, y2 = (v * IMAGE_SIDE / 1000 for v in box)
        inside = [i for i, (cx, cy) in enumerate(task.metadata["centers"]) if x1 <= cx <= x2 and y1 <= cy <= y2]
        return inside[0] if len(inside) == 1 else None

    def call_is_right(self, task: Task, name: str, arguments: Mapping[str, Any]) -> bool:
        """Whether the call shows the asked square or country (so the answer can be read off)."""
        return self.slot_of_call(task, name, arguments) == task.metadata.get("right", -1)


WORLDS = {"synthetic": SyntheticWorld, "gap": GapWorld}
"""``tasks.world`` of the job's config: ``gap`` (default) or the earlier ``synthetic`` world."""


def make_world(name: str, **kwargs) -> SyntheticWorld:
    if name not in WORLDS:
        raise ValueError(f"tasks.world must be one of {sorted(WORLDS)}, got {name!r}")
    return WORLDS[name](**kwargs)

"""Synthetic visual tasks a tiny Qwen-VL can learn on CPU in minutes (the embedded job's data).

Why these tasks: a tiny vision tower cannot read digits (docs/upstream.md §2b), so rewards on "which
digit" are noise. Every task here is either a *coarse visual attribute* (colour, left/right,
large/small), answered directly, or a task whose answer a *tool hands back as text*:

======== ==================================================== ======== ==========
family   question                                             tool     verifier
======== ==================================================== ======== ==========
color    What color is the shape?                             —        search_qa
position Is the shape on the left or the right?               —        search_qa
size     Is the shape large or small?                         —        search_qa
code     What is the image width times 3?  (image facts)      python   numeric
search   What is the capital of Zorvania?  (offline corpus)   search   search_qa
crop     What color is the small square in the top-left ...?  crop     search_qa
======== ==================================================== ======== ==========

With the default mix 75% of the tasks are answered directly and 25% need a tool, the shape of
the paper's SFT data (docs/algorithm.md §9). Every task is a :class:`~axpo_rllm.core.records.Task` with PIL
images, built deterministically from ``(seed, split, index)``; ``metadata["teacher"]`` holds the
call a teacher would make (tool name and arguments, or None) so that :mod:`axpo_rllm.train.sft` can
write teacher trajectories. The search facts come from one made-up corpus
(:func:`~axpo_rllm.demo.facts.make_fact_corpus`: names no model can know); train and eval
splits ask about disjoint facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

from axpo_rllm.envs.search_server import Document
from axpo_rllm.core.records import Task
from axpo_rllm.demo.facts import make_fact_corpus

__all__ = [
    "FAMILIES",
    "DEFAULT_MIX",
    "TOOL_OF_FAMILY",
    "COLORS",
    "SyntheticWorld",
    "family_of",
]

COLORS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
}
BACKGROUND = (245, 245, 245)
QUADRANTS: Mapping[str, tuple[int, int, int, int]] = {
    # name -> the crop box in Qwen3-VL's relative 0..1000 coordinates (the crop tool's default)
    "top-left": (0, 0, 500, 500),
    "top-right": (500, 0, 1000, 500),
    "bottom-left": (0, 500, 500, 1000),
    "bottom-right": (500, 500, 1000, 1000),
}
FAMILIES = ("color", "position", "size", "code", "search", "crop")
DEFAULT_MIX: Mapping[str, float] = {"color": 0.25, "position": 0.25, "size": 0.25, "code": 0.1, "search": 0.1, "crop": 0.05}
"""75% direct answers, 25% tool calls (the teacher's share in the paper's SFT data)."""
TOOL_OF_FAMILY: Mapping[str, str] = {"code": "python", "search": "search", "crop": "crop"}
SPLITS = ("train", "eval")


def family_of(task: Task) -> str:
    return str(task.metadata["family"])


def _shape_image(rng: random.Random, color: str, cx: int, cy: int, radius: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.rectangle(box, fill=COLORS[color])
    return image


@dataclass
class SyntheticWorld:
    """The task generator: one made-up fact corpus, and tasks drawn from it and from images.

    ``tasks(n, split)`` is a pure function of ``(seed, split, n, mix)``; the corpus is a pure
    function of ``(seed, n_facts)``. The first half of the facts belongs to ``train``, the second
    to ``eval``.
    """

    seed: int = 0
    n_facts: int = 400
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(FAMILIES)
        if unknown or not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix must map families of {FAMILIES} to non-negative weights with a positive sum, got {dict(self.mix)}")
        if self.n_facts < 2:
            raise ValueError(f"n_facts must be >= 2 (one train and one eval fact at least), got {self.n_facts}")
        self.documents, self.facts = make_fact_corpus(self.n_facts, seed=self.seed)

    @property
    def corpus(self) -> list[Document]:
        """The documents the search server must hold."""
        return list(self.documents)

    def tasks(self, n: int, split: str = "train", families: Sequence[str] | None = None) -> list[Task]:
        """``n`` tasks of ``split``; families drawn by ``mix`` (or cycled through ``families``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.seed}/{split}/tasks")
        names = list(self.mix)
        weights = [self.mix[k] for k in names]
        out = []
        for i in range(n):
            family = families[i % len(families)] if families else rng.choices(names, weights)[0]
            out.append(self.make(family, split, i))
        return out

    def make(self, family: str, split: str, index: int) -> Task:
        """Task ``index`` of ``family`` in ``split`` (deterministic)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        rng = random.Random(f"{self.seed}/{split}/{family}/{index}")
        question, answer, source, images, teacher, extra = getattr(self, f"_{family}")(rng, split, index)
        return Task(
            task_id=f"{split}-{index:05d}-{family}",
            question=question,
            answer=answer,
            data_source=source,
            images=tuple(images),
            metadata={"family": family, "split": split, "teacher": teacher, **extra},
        )

    # -- families (each returns question, answer, data_source, images, teacher call, metadata) --

    def _color(self, rng: random.Random, split: str, index: int):
        color = rng.choice(list(COLORS))
        image = _shape_image(rng, color, rng.randint(40, 72), rng.randint(40, 72), rng.randint(22, 34))
        return "What color is the shape?", color, "search_qa", [image], None, {}

    def _position(self, rng: random.Random, split: str, index: int):
        side = rng.choice(["left", "right"])
        cx = rng.randint(16, 36) if side == "left" else rng.randint(76, 96)
        image = _shape_image(rng, rng.choice(list(COLORS)), cx, rng.randint(20, 92), 14)
        return "Is the shape on the left or the right?", side, "search_qa", [image], None, {}

    def _size(self, rng: random.Random, split: str, index: int):
        large = rng.random() < 0.5
        radius = rng.randint(38, 48) if large else rng.randint(6, 10)
        margin = radius + 4
        image = _shape_image(rng, rng.choice(list(COLORS)), rng.randint(margin, 112 - margin), rng.randint(margin, 112 - margin), radius)
        return "Is the shape large or small?", "large" if large else "small", "search_qa", [image], None, {}

    def _code(self, rng: random.Random, split: str, index: int):
        width = rng.choice([56, 84, 112, 140])
        height = rng.choice([56, 84, 112])
        k = rng.randint(2, 9)
        dim = rng.choice(["width", "height"])
        image = _shape_image(rng, rng.choice(list(COLORS)), width // 2, height // 2, min(width, height) // 3, size=(width, height))
        value = (width if dim == "width" else height) * k
        teacher = {"name": "python", "arguments": {"code": f"print(images[0].{dim} * {k})"}}
        return f"What is the image {dim} times {k}?", str(value), "numeric", [image], teacher, {}

    def _search(self, rng: random.Random, split: str, index: int):
        half = len(self.facts) // 2
        pool = self.facts[:half] if split == "train" else self.facts[half:]
        question, answer = pool[index % len(pool)]
        image = Image.new("RGB", (56, 56), COLORS[rng.choice(list(COLORS))])  # a flag-like swatch: every prompt has an image
        teacher = {"name": "search", "arguments": {"query": question}}
        return question, answer, "search_qa", [image], teacher, {}

    def _crop(self, rng: random.Random, split: str, index: int):
        image = Image.new("RGB", (224, 224), BACKGROUND)
        draw = ImageDraw.Draw(image)
        colors = {}
        for name, (x1, y1, x2, y2) in QUADRANTS.items():
            colors[name] = rng.choice(list(COLORS))
            cx = (x1 + x2) * 224 // 2000 + rng.randint(-20, 20)
            cy = (y1 + y2) * 224 // 2000 + rng.randint(-20, 20)
            draw.rectangle((cx - 9, cy - 9, cx + 9, cy + 9), fill=COLORS[colors[name]])
        where = rng.choice(list(QUADRANTS))
        teacher = {"name": "crop", "arguments": {"image_index": 0, "bbox": list(QUADRANTS[where])}}
        return f"What color is the small square in the {where} corner?", colors[where], "search_qa", [image], teacher, {}

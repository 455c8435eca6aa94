"""Made-up facts for the demo's search tasks: a corpus of invented names and the questions it
answers. Invented names mean a model can only answer by searching (no prior knowledge leaks in),
which is what makes search rewards carry signal in the embedded CPU job."""

from __future__ import annotations

import random

from axpo_rllm.envs.search_server import Document

__all__ = ["make_fact_corpus", "make_flag_corpus"]

_SYLLABLES = ("zor", "va", "nia", "quel", "port", "ta", "rin", "mo", "bel", "dra", "kos", "lu", "fen", "ga", "sil")


def _made_up_name(rng: random.Random, syllables: int | None = None) -> str:
    count = syllables if syllables is not None else rng.randint(2, 3)
    return "".join(rng.choice(_SYLLABLES) for _ in range(count)).capitalize()


def make_fact_corpus(n_facts: int, seed: int = 0, distractors_per_fact: int = 2) -> tuple[list[Document], list[tuple[str, str]]]:
    """A synthetic corpus of made-up facts plus the questions it answers.

    Made-up names mean a model can only answer by searching (no prior knowledge leaks in), which
    is what makes search rewards carry signal in the embedded CPU job. Returns ``(documents,
    [(question, answer), ...])``.
    """
    rng = random.Random(seed)
    relations = (
        ("capital", "The capital of {e} is {a}.", "What is the capital of {e}?"),
        ("founder", "{e} was founded by {a}.", "Who founded {e}?"),
        ("river", "The longest river in {e} is the {a}.", "What is the longest river in {e}?"),
    )
    docs: list[Document] = []
    qa: list[tuple[str, str]] = []
    used: set[str] = set()
    while len(qa) < n_facts:
        entity = _made_up_name(rng)
        if entity in used:
            entity = f"{entity} {len(used)}"
        used.add(entity)
        key, fact, question = rng.choice(relations)
        answer = _made_up_name(rng)
        docs.append(Document(id=f"fact-{len(qa)}", title=entity, text=fact.format(e=entity, a=answer), url=f"local://fact/{len(qa)}"))
        qa.append((question.format(e=entity), answer))
        for j in range(distractors_per_fact):
            other = _made_up_name(rng)
            docs.append(
                Document(
                    id=f"noise-{len(qa)}-{j}",
                    title=other,
                    text=f"{other} is a {rng.choice(('town', 'lake', 'hill', 'poet'))} mentioned near {entity} in old {key} records.",
                    url=f"local://noise/{len(qa)}/{j}",
                )
            )
    rng.shuffle(docs)
    return docs, qa


def make_flag_corpus(
    n_blocks: int, per_block: int, colors: tuple[str, ...] = ("red", "green", "blue", "yellow"), seed: int = 0,
    syllables: int | None = None,
) -> tuple[list[Document], list[list[tuple[str, str]]]]:
    """Made-up countries and their flags' colours, in blocks of ``per_block`` countries whose
    colours all differ (one question names a block: a query for the wrong country shows another
    colour); ``syllables``: every name that long (else 2 or 3). Returns ``(documents, [[(country, colour), ...], ...])``; one document a country,
    "The flag of X is C.", and no other document names it."""
    if per_block > len(colors):
        raise ValueError(f"per_block={per_block} needs as many colours, got {list(colors)}")
    if syllables is not None and n_blocks * per_block > len(_SYLLABLES) ** syllables // 2:
        raise ValueError(f"{n_blocks * per_block} names of {syllables} syllables: too many for unique names")
    rng = random.Random(f"flags/{seed}")
    used: set[str] = set()
    docs: list[Document] = []
    blocks: list[list[tuple[str, str]]] = []
    for b in range(n_blocks):
        block = []
        for color in rng.sample(list(colors), per_block):
            name = _made_up_name(rng, syllables)
            while name.lower() in used:
                name = _made_up_name(rng, syllables)
            used.add(name.lower())
            docs.append(Document(id=f"flag-{len(docs)}", title=name, text=f"The flag of {name} is {color}.",
                                 url=f"local://flag/{len(docs)}"))
            block.append((name, color))
        blocks.append(block)
    return docs, blocks

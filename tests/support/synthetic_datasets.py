"""Small data sets in the public formats, generated on the spot (tests never download anything).

Every writer here uses pyarrow / ``datasets`` / plain json directly, never axpo-rllm's own
writers, so a loader test checks our reader against the format, not against ourselves. Rows imitate
the paper's sets: ViRL-, fvqa-, PyVision-RL-, MMFineReason-like training rows and MathVision-,
DynaMath-, Math-VR-, V*-, VisualProbe-, HR-Bench- and MMSearch-like benchmark rows.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def image(color: str = "red", size=(48, 40)):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(im).rectangle((8, 8, size[0] - 8, size[1] - 8), fill=COLORS[color])
    return im


def png(color: str = "red", size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    image(color, size).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(color: str = "blue", size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    image(color, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def truncated_png() -> bytes:
    """A PNG whose header reads (size known) but whose pixel data is cut: fails only at decode."""
    data = png("green", (64, 64))
    return data[: len(data) // 2]


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def verl_parquet(path: Path, data_source: str = "fvqa", n: int = 3) -> Path:
    """verl RL rows (fvqa / MMSearch / PyVision-RL style): chat prompt with <image>, image structs, aliases."""
    facts = [("Which city is this landmark in?", ["Paris", "paris, france"]), ("Who designed it?", ["Gustave Eiffel"]),
             ("What year was it built?", ["1889"])]
    rows = []
    for i in range(n):
        q, aliases = facts[i % len(facts)]
        rows.append({
            "data_source": data_source,
            "prompt": [{"role": "system", "content": "Answer with a short phrase."},
                       {"role": "user", "content": f"<image>\n{q} (#{i})"}],
            "images": [{"bytes": png(list(COLORS)[i % 3]), "path": f"img{i}.png"}],
            "ability": "search",
            "reward_model": {"style": "rule", "ground_truth": aliases},
            "extra_info": {"index": i, "split": "test"},
        })
    return _write_parquet(path, rows)


def virl_parquet(path: Path, n: int = 3) -> Path:
    """ViRL39K-like training rows: question with <image>, boxed answers, image list of bytes."""
    rows = [{"qid": f"virl-{i}", "question": f"<image>What is {i} + 2? Put the answer in \\boxed{{}}.",
             "answer": f"\\boxed{{{i + 2}}}", "image": [{"bytes": jpeg(), "path": None}], "category": "arithmetic",
             "data_source": "ViRL39K"} for i in range(n)]
    return _write_parquet(path, rows)


def hf_mathvision(path: Path, n: int = 3) -> Path:
    """A MathVision-like Hugging Face dataset saved to disk (``Image`` feature, options on some rows)."""
    import datasets

    data = {
        "id": [str(i) for i in range(n)],
        "question": [f"How many sides does shape {i} have?" for i in range(n)],
        "options": [["3", "4", "5", "6"] if i % 2 == 0 else [] for i in range(n)],
        "answer": ["B" if i % 2 == 0 else str(i + 3) for i in range(n)],
        "decoded_image": [image(list(COLORS)[i % 3]) for i in range(n)],
    }
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "options": datasets.List(datasets.Value("string")), "answer": datasets.Value("string"),
                                  "decoded_image": datasets.Image()})
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return path


def jsonl_vstar(folder: Path, n: int = 3) -> Path:
    """V*-like jsonl + an image folder (JPEG files; options in the question, letter answers)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/v{i}.jpg"
        (folder / name).write_bytes(jpeg(list(COLORS)[i % 3], (80, 60)))
        lines.append({"id": f"v{i}", "question": f"What is the color of the box? (A) red (B) blue (C) green", "answer": "ABC"[i % 3],
                      "image": name, "data_source": "vstar", "category": "color"})
    path = folder / "vstar.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tsv_hrbench(path: Path, n: int = 2) -> Path:
    """HR-Bench-like VLMEvalKit TSV: base64 images inline, A-D option columns, letter answers."""
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "image"]
    lines = ["\t".join(header)]
    for i in range(n):
        b64 = base64.b64encode(png("blue", (96, 96))).decode()
        lines.append("\t".join([str(i), f"What color is the square {i}?", "B", "single", "red", "blue", "green", "yellow", b64]))
    path.write_text("\n".join(lines) + "\n")
    return path


def dynamath_jsonl(folder: Path) -> Path:
    """DynaMath-like rows with their own answer_type (multiple choice / float / free-form)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.png").write_bytes(png())
    rows = [
        {"id": "d0", "question": "Which is larger? A: 2 B: 3", "answer": "B", "answer_type": "multiple choice", "image": "d.png"},
        {"id": "d1", "question": "What is the slope?", "answer": "0.5", "answer_type": "float", "image": "d.png", "rel_tol": 0.03},
        {"id": "d2", "question": "Simplify x+x.", "answer": "2x", "answer_type": "free-form", "image": "d.png"},
    ]
    path = folder / "dynamath.jsonl"
    path.write_text("".join(json.dumps({**r, "data_source": "DynaMath"}) + "\n" for r in rows))
    return path


def bad_jsonl(folder: Path) -> Path:
    """One good V* row, then one row of each kind of bad (lines 2-10), for the bad-row tests."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ok.png").write_bytes(png())
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    good = {"id": "g", "question": "Q?", "answer": "A", "image": "ok.png", "data_source": "vstar"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "m", "image": "missing.png"}),
        json.dumps({**good, "id": "c", "image": "garbage.png"}),
        json.dumps({**good, "id": "n", "answer": None}),
        json.dumps({**good, "id": "u", "data_source": "mystery-bench"}),
        json.dumps({**good, "id": "k", "answer_type": "vibes"}),
        json.dumps({**good, "id": "p", "question": "<image><image>Two?"}),
        "{not json",
        json.dumps(good),  # a duplicate id
        json.dumps({**good, "id": "x", "answer": "Z", "options": ["red", "blue"]}),
    ]
    path = folder / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path

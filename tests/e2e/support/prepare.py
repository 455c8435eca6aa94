"""What the end-to-end rllm run trains on: a small SFT checkpoint of the tiny Qwen-VL and data files.

The policy must call tools and sometimes answer right, or AXPO has nothing to act on: the main job's
SFT stage (teacher trajectories of the synthetic world, 150 steps: 2-3 minutes on CPU) is reused with the
tool schemas the launcher's env shows (full descriptions, not the main job's compact ones), so the
rllm run's prompts are the ones the model was trained on.

The question files (jsonl rows in the public format ``axpo-rllm data`` reads, images as PNG files):

- train: a ``code`` question whose gold answer no rollout can produce (every rollout is wrong, so
  when one of them calls a tool the question triggers AXPO's resampling on the step that draws
  it), a text-only ``search`` question (no image: its micro-batches are all text), a ``color``
  and a ``crop`` question (mixed outcomes, so advantages are not all zero);
- val: a ``color`` and a ``code`` question.

Usage: ``python prepare.py OUT_DIR [--sft-steps S]``; prints a JSON summary (model dir, files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from axpo_rllm.demo.main_job import Runtime, job_config, stage_sft
from axpo_rllm.demo.world import SyntheticWorld
from axpo_rllm.envs.env import SharedToolsEnvFactory

TOOLS = ["crop", "python", "search"]
IMPOSSIBLE = "-123457"  # the image width times k is positive: no rollout is right
KINDS = {"search_qa": "em", "numeric": "numeric"}


def sft_overrides(steps: int) -> list[str]:
    """A fixed number of SFT steps (the main job's budget is wall-clock, which a loaded machine cuts
    short: 54 steps instead of 95 left a policy that never called a tool)."""
    return ["tools.compact_schemas=false", "sft.minutes=60", f"sft.max_steps={steps}", "sft.examples=800",
            "sft.probe_tasks=16", "model.tokenizer_conversations=120", *SYNTHETIC_WORLD]


SYNTHETIC_WORLD = [
    # The runs' questions come from the synthetic world (every family, all three tools), whatever
    # world the embedded job defaults to: SFT teaches its calls, always right, 40% answered directly.
    "tasks.world=synthetic", "tasks.teacher_direct_share=0.4", "tasks.teacher_right_call_share=1.0",
    "tasks.sft_mix=null", "tasks.asked=null", f"tools.names=[{','.join(TOOLS)}]", "tools.search_top_k=2", "eval.families=null",
]


def build_checkpoint(out: Path, steps: int) -> dict:
    cfg = job_config(None, sft_overrides(steps))
    with Runtime(cfg, log=lambda msg: print(msg, file=sys.stderr)) as rt:
        launcher_schemas = SharedToolsEnvFactory(TOOLS, {"search": {"base_url": rt.server.url}})().tool_schemas()
        if rt.tool_schemas != launcher_schemas:  # the run's prompts must be the ones SFT trained on
            raise RuntimeError("the main job's tool schemas differ from the launcher's env: SFT would train other prompts")
        rt.build_model()
        stats = stage_sft(rt, log=lambda msg: print(msg, file=sys.stderr))
        model_dir = out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(rt.model_dir, model_dir)
        rt.policy.model.save_pretrained(model_dir)
    return {"model": str(model_dir), "sft": {k: stats[k] for k in ("steps", "loss_first", "loss_last", "after", "cached")
                                             if k in stats}}


def _row(task, out: Path, drop_images: bool = False, answer: str | None = None) -> dict:
    paths = []
    if not drop_images:
        for i, image in enumerate(task.images):
            path = out / "images" / f"{task.task_id}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            paths.append(str(path))
    return {"id": task.task_id, "question": task.question, "answer": answer if answer is not None else task.answer,
            "images": paths, "answer_kind": KINDS[task.data_source], "data_source": "e2e_synthetic"}


def write_data(out: Path) -> dict:
    world = SyntheticWorld(seed=0, n_facts=400)
    code, color, search, crop = (world.make(family, "train", 7) for family in ("code", "color", "search", "crop"))
    train = [_row(code, out, answer=IMPOSSIBLE), _row(search, out, drop_images=True), _row(color, out), _row(crop, out)]
    val = [_row(world.make("color", "eval", 3), out), _row(world.make("code", "eval", 3), out)]
    files = {}
    for split, rows in (("train", train), ("val", val)):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return {"files": files, "corpus_seed": 0, "n_facts": 400, "impossible": code.task_id, "text_only": search.task_id}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--sft-steps", type=int, default=150)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_checkpoint(out, args.sft_steps) | write_data(out)
    (out / "prepared.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

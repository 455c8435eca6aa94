"""What the end-to-end test reads back from inside the trainer (test support; never shipped).

Imported in every process of the run through ``VERL_USE_EXTERNAL_MODULES``; active where rllm's
verl backend is imported (the trainer actor) and ``AXPO_E2E_DUMP`` names a folder. Before each
actor update it writes ``step_<k>.json``: the verl batch's advantages row by row (the value on the
row's loss tokens, with the row's trajectory id) beside what AXPO's grouping hook put on each
trajectory (group id, role, the core's advantage), and the step's question ids. Nothing changes
in what the trainer does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import wrapt


def _digest(batch, i: int) -> str:
    """The row's tokens (prompt and response, padding left out), hashed."""
    ids = batch.batch["input_ids"][i][batch.batch["attention_mask"][i].bool()]
    return hashlib.sha1(ids.cpu().numpy().astype("int64").tobytes()).hexdigest()


def _image_tokens(batch, i: int) -> dict:
    """The row's image pads beside the features its images give (``AXPO_E2E_IMAGE_PAD``: the pad
    id; each image gives t·h·w / merge² features): equal, or the model's forward fails."""
    pad = os.environ.get("AXPO_E2E_IMAGE_PAD")
    if not pad:
        return {}
    merge = int(os.environ.get("AXPO_E2E_MERGE", "2"))
    ids = batch.batch["input_ids"][i][batch.batch["attention_mask"][i].bool()]
    inputs = (batch.non_tensor_batch.get("multi_modal_inputs", [None] * (i + 1))[i] or {})
    grid = inputs.get("image_grid_thw")
    features = int(sum(int(t) * int(h) * int(w) for t, h, w in grid.tolist()) // merge**2) if grid is not None else 0
    return {"image_pads": int((ids == int(pad)).sum()), "image_features": features}


def _row_advantages(batch) -> list[dict]:
    adv = batch.batch["advantages"]
    mask = batch.batch["response_mask"].bool()
    ids = batch.non_tensor_batch.get("trajectory_ids")
    pad = batch.non_tensor_batch.get("is_pad_step")
    rows = []
    for i in range(adv.shape[0]):
        if pad is not None and bool(pad[i]):
            continue
        values = adv[i][mask[i]]
        row = {"trajectory_id": str(ids[i]) if ids is not None else str(i), "tokens": int(mask[i].sum()),
               "first": float(values[0]) if len(values) else 0.0,
               "spread": float(values.max() - values.min()) if len(values) else 0.0,
               "digest": _digest(batch, i)} | _image_tokens(batch, i)
        if "rollout_log_probs" in batch.batch and "old_log_probs" in batch.batch and len(values):
            gap = (batch.batch["rollout_log_probs"][i] - batch.batch["old_log_probs"][i]).abs()[mask[i]]
            row |= {"gap_mean": float(gap.mean()), "gap_max": float(gap.max()),
                    "images": int(len((batch.non_tensor_batch.get("multi_modal_inputs", [None] * (i + 1))[i] or {})
                                      .get("image_grid_thw", [])))}
        rows.append(row)
    return rows


def _rollout(trajectory):
    return (trajectory.metadata or {}).get("axpo_rollout")


def _groups(groups) -> list[dict]:
    out = []
    for g in groups or []:
        out.append({"group_id": g.group_id, "trajectories": [
            {"uid": t.uid, "steps": len(t.steps), "role": (t.metadata or {}).get("axpo_role"),
             "failed": _rollout(t) is not None and _rollout(t).termination.value == "error",
             "error": _rollout(t).error[:300] if _rollout(t) is not None else "",
             "advantage": (t.metadata or {}).get("axpo_advantage"), "reward": float(t.reward or 0.0)}
            for t in g.trajectories]})
    return out


def _dump(trainer_state) -> None:
    folder = Path(os.environ["AXPO_E2E_DUMP"])
    folder.mkdir(parents=True, exist_ok=True)
    episodes = trainer_state.episodes or []
    record = {
        "step": int(trainer_state.global_step),
        "questions": sorted({str((ep.task or {}).get("task_id", ep.id.split(":")[0])) if isinstance(ep.task, dict)
                             else ep.id.split(":")[0] for ep in episodes}),
        "rows": _row_advantages(trainer_state.backend_batch),
        "groups": _groups(trainer_state.trajectory_groups),
        "axpo_seed_step": [ep.metadata.get("axpo_step") for ep in episodes][:1],
    }
    (folder / f"step_{record['step']}.json").write_text(json.dumps(record, indent=1, default=str))


@wrapt.when_imported("rllm.trainer.verl.verl_backend")
def _wrap_update(module) -> None:
    if not os.environ.get("AXPO_E2E_DUMP"):
        return
    original = module.VerlBackend.update_policy

    @functools.wraps(original)
    async def update_policy(self, trainer_state, **kwargs):
        _dump(trainer_state)
        return await original(self, trainer_state, **kwargs)

    module.VerlBackend.update_policy = update_policy

"""Records -> rllm types: a rollout as an rllm ``Trajectory``, and AXPO's grouping hook.

:func:`axpo_traj_grouping_hook` (rllm's ``traj_grouping_hook``) rebuilds the core's training rows
from the episodes (``build_training_rows``: recovery reward, separate continuation groups, masks)
and hands them over as ``TrajectoryGroup`` s with group ids ``<advantage group>:axpo``; every
trajectory keeps only its loss window (a continuation's prefix becomes prompt, a credited source
is cut after its prefix), its reward is the row's score. A step with a failed question run stops
here (:func:`check_question_runs`), before any advantage or update.
"""

from __future__ import annotations

from typing import Any, Sequence

from rllm.engine.rollout.rollout_engine import ModelOutput
from rllm.types import Episode as RllmEpisode
from rllm.types import Step, Trajectory, TrajectoryGroup

from axpo_rllm.core.advantages import original_groups
from axpo_rllm.core.config import AXPOConfig
from axpo_rllm.core.failures import StepFailedError
from axpo_rllm.core.records import ResamplePlan, Rollout, RolloutKind, TrainingRow
from axpo_rllm.core.step import finish_step
from axpo_rllm.engines.vision import TrainingInputs, first_images
from axpo_rllm.integrations.rllm.estimator import AXPO_ROLE

__all__ = ["rollout_to_trajectory", "check_question_runs", "axpo_traj_grouping_hook"]


def rollout_to_trajectory(
    rollout: Rollout,
    window: tuple[int, int] | None = None,
    inputs: TrainingInputs | None = None,
    name: str = "axpo",
) -> Trajectory:
    """An rllm ``Trajectory`` whose steps are the rollout's model-token runs inside ``window``.

    Step ``i``'s prompt is ``prompt + response[:start_i]`` exactly, so rllm's merge of
    prefix-extending steps rebuilds one row with observation tokens masked; tokens before the
    window become prompt (a continuation's prefix is context, not action).

    With images the ids are processor-expanded as rllm's own ``VerlEngine`` stores them:
    ``inputs`` is the whole rollout expanded (:meth:`VisionProcessing.expand`), every step's ids
    come from it, and every step carries the ``multi_modal_inputs`` of all the images the row refers
    to — task images, then tool images, in order — because rllm keeps only a merged row's first
    step's inputs. A rollout with images and no ``inputs`` is refused (its features would be lost).
    """
    start, end = window if window is not None else (0, len(rollout.response_ids))
    mask = rollout.response_mask[start:end].astype(bool)
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((start + i, start + j))
            i = j
        else:
            i += 1
    n_images = sum(1 for off in rollout.image_offsets if off < end)
    if n_images and inputs is None:
        raise ValueError(
            f"rollout {rollout.rollout_id} refers to {n_images} image(s): build its trajectory with the "
            "processor-expanded inputs (AXPORllmWorkflow(vision=VisionProcessing(...)))"
        )
    n_prompt = len(rollout.prompt_ids)
    if inputs is not None:
        ids, where = inputs.input_ids, inputs.index
        mm = first_images(inputs.multi_modal_inputs, n_images) or None
        at = lambda k: where[n_prompt + k] if n_prompt + k < len(where) else len(ids)  # noqa: E731
    else:
        ids = [int(t) for t in rollout.prompt_ids] + [int(t) for t in rollout.response_ids]
        mm = None
        at = lambda k: n_prompt + k  # noqa: E731
    steps = []
    for k, (a, b) in enumerate(runs):
        # model tokens are never image pads, so a run stays contiguous in the expanded ids
        prompt_ids, completion = list(ids[: at(a)]), list(ids[at(a) : at(b - 1) + 1])
        output = ModelOutput(
            prompt_ids=prompt_ids,
            completion_ids=completion,
            logprobs=[float(x) for x in rollout.response_logprobs[a:b]],
            multi_modal_inputs=mm,
            prompt_length=len(prompt_ids),
            completion_length=len(completion),
            finish_reason="stop",
        )
        steps.append(Step(
            prompt_ids=output.prompt_ids, response_ids=output.completion_ids, logprobs=output.logprobs,
            model_output=output, reward=float(rollout.reward) if k == len(runs) - 1 else 0.0,
            done=k == len(runs) - 1, chat_completions=[{"role": "assistant", "content": ""}],
        ))
    return Trajectory(
        uid=rollout.rollout_id, name=name, steps=steps, reward=float(rollout.reward),
        metadata={"axpo_rollout": rollout, "axpo_window": (start, end), "axpo_inputs": inputs},
    )


def check_question_runs(episodes: Sequence[RllmEpisode]) -> None:
    """Stop the step, before anything trains, when a question run did not deliver its episode.

    AXPO's runs never fail for a rollout's fault (a failed rollout is recorded and kept out of the
    loss); a run fails only when the step cannot go on: the failure share passed its bound, the
    plan could not be made, the task could not be built, rllm's workflow timeout cut it. rllm then
    hands over an episode of its own (termination ``error`` or ``timeout``, the exception in
    ``info["error"]``; the launcher sets ``rllm.workflow.raise_on_error: false`` so that it does,
    and ``retry_limit: 1`` so that a question is never planned twice). Training on the rest would
    train on a step whose plan, budget and statistics assumed the missing questions.
    """
    broken = [ep for ep in episodes if "axpo_plan" not in (ep.metadata or {})]
    if not broken:
        return
    reasons = []
    for ep in broken:
        error = (getattr(ep, "info", None) or {}).get("error") or {}
        reason = getattr(ep.termination_reason, "value", ep.termination_reason)
        detail = f"{error.get('error_type', '')}: {error.get('error_message', '')}" if error else "no AXPO episode"
        task = ep.task if isinstance(ep.task, dict) else {}
        reasons.append(f"question {task.get('task_id') or task.get('id') or ep.id} ({reason}) {detail}")
    raise StepFailedError(f"{len(broken)} of {len(episodes)} question runs of the step failed, nothing of the step "
                          f"is trained: " + "; ".join(r[:1500] for r in reasons))


def axpo_traj_grouping_hook(episodes: list[RllmEpisode], transform_config: Any = None,
                            compact_filtering_config: Any = None) -> list[TrajectoryGroup]:
    """rllm's ``traj_grouping_hook``: the core's training rows as ``TrajectoryGroup`` s (role ``axpo``).

    Every episode's trajectories are reused (rllm checks they are not copies): each is cut to its
    row's loss window, its reward set to the row's score (r_prefix for a credited source) and the
    core's advantage stored in ``metadata["axpo_advantage"]``. A fully masked row (an over-turn
    rollout under the ``mask`` cap policy) keeps its place in its group with no steps.
    """
    check_question_runs(episodes)
    by_step: dict[int, list[RllmEpisode]] = {}
    for ep in episodes:
        by_step.setdefault(ep.metadata["axpo_step"], []).append(ep)
    groups: list[TrajectoryGroup] = []
    for _, eps in sorted(by_step.items(), key=lambda item: str(item[0])):
        plan: ResamplePlan = eps[0].metadata["axpo_plan"]
        config: AXPOConfig = eps[0].metadata["axpo_config"]
        trajs = {t.metadata["axpo_rollout"].rollout_id: t for ep in eps for t in ep.trajectories}
        rollouts = [t.metadata["axpo_rollout"] for t in trajs.values()]
        originals = [r for r in rollouts if r.kind is RolloutKind.ORIGINAL]
        conts = [r for r in rollouts if r.kind is RolloutKind.CONTINUATION]
        rows = finish_step(original_groups(originals), plan, conts, config).rows  # phase 4 (core.step)
        members: dict[str, list[tuple[TrainingRow, Trajectory]]] = {}
        for row in rows:
            if len(row.segments) > 1:
                raise ValueError("source_tail=keep puts two advantages on one row; rllm carries one per trajectory")
            traj = trajs[row.rollout.rollout_id]
            window = (row.segments[0].start, row.segments[0].end) if row.segments else None
            fresh = rollout_to_trajectory(row.rollout, window, traj.metadata.get("axpo_inputs")) if window else None
            traj.steps = fresh.steps if fresh is not None else []
            traj.reward = float(row.score)
            traj.metadata = {**(traj.metadata or {}), "axpo_role": row.role.value,
                             "axpo_advantage": float(row.segments[0].advantage) if row.segments else 0.0,
                             "axpo_window": window}
            members.setdefault(row.adv_group, []).append((row, traj))
        for adv_group, items in members.items():
            groups.append(TrajectoryGroup(
                trajectories=[t for _, t in items],
                group_id=f"{adv_group.replace('::', '/').replace(':', '/')}:{AXPO_ROLE}",
                metadata=[{"axpo_role": row.role.value, "rollout_id": row.rollout.rollout_id, "axpo_config": config}
                          for row, _ in items],
            ))
    return groups

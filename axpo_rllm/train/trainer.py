"""The CPU AXPO/GRPO update loop: verl's estimator and losses on a Hugging Face actor.

One step, in the order it happens (docs/algorithm.md §1–§6)::

    workflow.run_step(tasks)             B questions x N rollouts, plan, K continuations per prefix
      -> build_verl_batch(rows, vision)  verl DataProto, processor-expanded; response_mask = AXPO's loss mask
      -> compute_advantage(batch, "axpo") verl's own dispatcher runs the registered estimator
      -> actor log-probs (grad)          HF forward over the batch as verl's actor reads it (images, M-RoPE)
         reference log-probs (no grad)   the frozen SFT model
      -> old log-probs (no grad)         once, before the first mini-batch (verl recomputes them)
      -> per mini-batch of questions     ``ppo_mini_batch_size`` questions (verl's key), batch order:
         compute_policy_loss_vanilla     PPO clip, eps_low 0.2 / eps_high 0.4, token-mean
         + beta * kl_penalty(low_var_kl) beta = 1e-3, token-mean over the same mask
         AdamW step                      one per mini-batch: later mini-batches see a moved policy,
                                         so the ratio leaves 1 and the clip can bind
      the engine shares the module: it samples the new weights

GRPO and every ablation are the same loop under another ``load_config(ablation)``: the workflow
reads ``algorithm.axpo`` and ``actor_rollout_ref.rollout.n``; with nothing triggered the ``axpo``
estimator equals verl's GRPO.

Token-mean over the mini-batch with micro-batches: every micro-batch's ``agg_loss`` divides by
the mini-batch's total loss-token count (verl's ``global_batch_info["batch_num_tokens"]``), so the
summed gradients equal one token-mean over the mini-batch. Rows whose loss mask is all zero (masked
sources' tails are not; over-turn rollouts and fully masked rows are) add nothing to the loss, and
are skipped from the forward when ``skip_masked_rows`` is on.

Two exact savings (issue 14: AXPO's extra rows should cost their tokens, not whole passes):
- A row is forwarded only up to its last loss token (``trim_to_loss``): in a causal model no
  logit at or before that token depends on what follows, so the loss and its gradient are
  unchanged. An AXPO source credited on its prefix is forwarded as prompt + prefix; a row ending in
  an observation or a masked tail loses those tokens (and the images in them).
- Micro-batches are cut by padded tokens, not rows (``micro_batch_tokens``; verl's dynamic batch
  size does the same by token count): rows sorted by length, each micro-batch at most
  ``micro_batch_tokens`` = rows x longest row, so a step with a few more rows costs a few more
  tokens rather than another half-empty pass.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty
from verl.trainer.ppo.ray_trainer import compute_advantage

from axpo_rllm.core.config import dataclass_from_mapping, std_normalization
from axpo_rllm.core.records import Task
from axpo_rllm.integrations.verl import estimator as _registers_axpo  # noqa: F401  # "axpo" in verl's registry, entry point or not
from axpo_rllm.integrations.verl.batch import VisionProcessing, build_verl_batch
from axpo_rllm.train.actor import Policy, batch_logprobs

__all__ = ["RLConfig", "AXPOTrainer", "frozen_reference", "sync_weights", "actor_loss_config"]


@dataclass(frozen=True)
class RLConfig:
    steps: int = 20
    batch_questions: int = 4
    """B: questions per step."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    """Passes over the step's batch; the old log-probs are computed once, before the first (verl's way)."""
    ppo_mini_batch_size: int = 0
    """Questions per optimiser step, as verl's ``actor.ppo_mini_batch_size`` (counted in prompts):
    the batch is cut, in batch order, into mini-batches of that many whole questions (a question's
    continuation rows go with it, so every arm takes ceil(B / this) steps), one optimiser step each.
    0: the whole batch in one step (the ratio is then 1 and the clip never binds)."""
    micro_batch_size: int = 16
    """At most this many rows per forward pass (memory); the loss stays one token-mean over the batch."""
    micro_batch_tokens: int = 8192
    """At most this many padded tokens (rows x the longest row) per forward pass; rows are sorted
    by length first. 0: fixed ``micro_batch_size`` rows in batch order."""
    trim_to_loss: bool = True
    """Forward each row only up to its last loss token (exact: module docstring)."""
    skip_masked_rows: bool = True
    log_path: str | None = None
    """JSONL file that gets one line of metrics per step (None: no file)."""


def frozen_reference(policy: Policy) -> Policy:
    """A frozen copy of the policy (the SFT model: AXPO's KL anchor, docs/algorithm.md §6)."""
    ref = copy.deepcopy(policy.model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return Policy(ref, policy.image_processor, policy.pad_token_id)


def sync_weights(engine: Any, model: torch.nn.Module) -> str:
    """Give the rollout engine the actor's weights; returns how.

    A :class:`~axpo_rllm.engines.transformers_engine.TransformersEngine` built on the actor's own
    module (``engine.model is model``) samples the new weights with no copy. An engine with its
    own copy of the module gets a ``load_state_dict``; one exposing ``load_weights`` (a vLLM
    worker's API) gets the named tensors.
    """
    inner = getattr(engine, "inner", engine)  # wrappers (tool-biased test engines) delegate
    own = getattr(inner, "model", None)
    if own is model:
        return "shared"
    if isinstance(own, torch.nn.Module):
        own.load_state_dict(model.state_dict())
        return "load_state_dict"
    load = getattr(inner, "load_weights", None)
    if callable(load):
        load(((name, p.detach()) for name, p in model.named_parameters()))  # type: ignore[attr-defined]
        return "load_weights"
    raise NotImplementedError(
        f"cannot push weights into {type(inner).__name__}: it neither shares the actor module nor exposes "
        "a torch module or load_weights(); rebuild it from a saved checkpoint instead"
    )


def actor_loss_config(cfg: DictConfig, batch_num_tokens: int) -> DictConfig:
    """The slice of verl's actor config that ``compute_policy_loss_vanilla`` reads."""
    actor = cfg.actor_rollout_ref.actor
    return OmegaConf.create(
        {
            "clip_ratio": float(actor.get("clip_ratio", 0.2)),
            "clip_ratio_low": float(actor.clip_ratio_low),
            "clip_ratio_high": float(actor.clip_ratio_high),
            "clip_ratio_c": float(actor.get("clip_ratio_c", 3.0)),
            "global_batch_info": {"dp_size": 1, "batch_num_tokens": int(batch_num_tokens)},
        }
    )


class AXPOTrainer:
    """Runs ``workflow`` steps and updates ``policy`` with verl's estimator and losses."""

    def __init__(
        self,
        policy: Policy,
        workflow: Any,
        cfg: DictConfig,
        rl: RLConfig = RLConfig(),
        reference: Policy | None = None,
    ) -> None:
        self.policy = policy
        self.reference = reference if reference is not None else frozen_reference(policy)
        self.workflow = workflow
        self.cfg = cfg
        self.rl = rl
        params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
        self.params = params
        self.history: list[dict] = []
        self.sync_mode = sync_weights(workflow.engine, policy.model)
        if rl.log_path:
            Path(rl.log_path).parent.mkdir(parents=True, exist_ok=True)

    # -- one step ---------------------------------------------------------------------------------

    def step(self, tasks: Sequence[Task], step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        result = self.workflow.run_step(tasks, step)
        t1 = time.perf_counter()
        batch = self.make_batch(result.rows)
        metrics = dict(result.metrics)
        metrics.update(self.update(batch))
        sync_weights(self.workflow.engine, self.policy.model)
        t2 = time.perf_counter()
        rewards = [r.reward for g in result.groups for r in g.rollouts]
        metrics.update(
            {
                "step": float(step),
                "train/reward_mean": float(sum(rewards) / len(rewards)) if rewards else math.nan,
                "train/rows": float(len(result.rows)),
                "timing/rollout_s": t1 - t0,
                "timing/update_s": t2 - t1,
                "timing/step_s": t2 - t0,
            }
        )
        self.history.append(metrics)
        if self.rl.log_path:
            with open(self.rl.log_path, "a") as f:
                f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}) + "\n")
        return metrics

    def make_batch(self, rows):
        """The verl batch of ``rows`` with advantages from verl's own ``compute_advantage``."""
        vision = VisionProcessing.from_model(self.policy.model, self.policy.image_processor)
        batch = build_verl_batch(rows, pad_token_id=self.policy.pad_token_id, vision=vision)
        algo = self.cfg.algorithm
        batch = compute_advantage(batch, algo.adv_estimator, norm_adv_by_std_in_grpo=std_normalization(algo), config=algo)
        batch.meta_info["rows"] = list(rows)
        return batch

    # -- the update ---------------------------------------------------------------------------------

    def update(self, batch) -> dict[str, float]:
        """One optimiser step per mini-batch (:meth:`mini_batches`) per PPO epoch on ``batch`` (a
        DataProto from :meth:`make_batch`); metrics are means over the optimiser steps."""
        mask = batch.batch["response_mask"]
        metrics: dict[str, float] = {"actor/loss_tokens": float(mask.sum()), "actor/masked_rows": float((mask.sum(-1) == 0).sum())}
        if int(mask.sum()) == 0:
            metrics["actor/skipped"] = 1.0
            return metrics
        minis = [rows for rows in self.mini_batches(batch) if int(mask[rows].sum()) > 0]
        # on-policy single step: the current log-probs detached are the old ones (ratio exactly 1)
        old = self.old_log_probs(batch) if self.rl.ppo_epochs > 1 or len(minis) > 1 else None
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(self.rl.ppo_epochs):
            for rows in minis:
                for name, value in self.backward(batch, old, rows).items():
                    sums[name] = sums.get(name, 0.0) + value
                sums["actor/grad_norm"] = sums.get("actor/grad_norm", 0.0) + float(
                    torch.nn.utils.clip_grad_norm_(self.params, self.rl.grad_clip))
                self.optimizer.step()
                steps += 1
        metrics.update({k: v / steps for k, v in sums.items()})
        metrics["actor/optimizer_steps"] = float(steps)
        return metrics

    def mini_batches(self, batch) -> list[list[int]]:
        """Row indices per optimiser step: ``ppo_mini_batch_size`` whole questions each, questions in
        the order they first appear in the batch, rows in batch order (one list when it is 0)."""
        every = list(range(len(batch)))
        size = self.rl.ppo_mini_batch_size
        if size < 0:
            raise ValueError(f"rl.ppo_mini_batch_size must be >= 0 (0: the whole batch), got {size}")
        questions = list(dict.fromkeys(batch.non_tensor_batch["question_id"].tolist()))
        if size == 0 or size >= len(questions):
            return [every]
        which = {q: i // size for i, q in enumerate(questions)}
        out: list[list[int]] = [[] for _ in range(math.ceil(len(questions) / size))]
        for i, q in zip(every, batch.non_tensor_batch["question_id"].tolist()):
            out[which[q]].append(i)
        return out

    def micro_batches(self, batch, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Forward passes over ``rows`` (default: every row), fully masked rows skipped when asked."""
        mask = batch.batch["response_mask"]
        rows = range(mask.shape[0]) if rows is None else rows
        keep = [i for i in rows if not (self.rl.skip_masked_rows and mask[i].sum() == 0)]
        if not self.rl.micro_batch_tokens:
            return [keep[i : i + self.rl.micro_batch_size] for i in range(0, len(keep), self.rl.micro_batch_size)]
        lengths = self._inputs(batch)[0].sum(-1)
        return padded_token_batches(keep, [int(lengths[i]) for i in keep], self.rl.micro_batch_tokens, self.rl.micro_batch_size)

    def _inputs(self, batch) -> tuple[torch.Tensor, list | None]:
        """The attention mask and vision inputs the forward reads: trimmed to each row's last loss
        token (``trim_to_loss``), computed once per batch."""
        cached = batch.meta_info.get("_forward_inputs")
        if cached is None:
            t = batch.batch
            mm = batch.non_tensor_batch.get("multi_modal_inputs")
            mm = None if mm is None else list(mm)
            if self.rl.trim_to_loss:
                cached = trim_to_loss(t["input_ids"], t["attention_mask"], t["response_mask"], t["prompts"].shape[1],
                                      mm, self.policy.image_pad_id, int(self.policy.image_processor.merge_size))
            else:
                cached = (t["attention_mask"], mm)
            batch.meta_info["_forward_inputs"] = cached
        return cached

    def forward(self, policy: Policy, batch, idx: Sequence[int], entropy: bool = False):
        """Response log-probs of rows ``idx``, read from the verl batch as verl's actor reads it
        (expanded ids, (bs, 4, L) M-RoPE positions, ``multi_modal_inputs``); positions past a row's
        last loss token are 0 with ``trim_to_loss``."""
        t = batch.batch
        attention, mm = self._inputs(batch)
        return batch_logprobs(
            policy.model,
            t["input_ids"][idx],
            attention[idx],
            t["position_ids"][idx],
            None if mm is None else [mm[i] for i in idx],
            prompt_width=t["prompts"].shape[1],
            pad_token_id=policy.pad_token_id,
            with_entropy=entropy,
        )

    def old_log_probs(self, batch) -> torch.Tensor:
        """The actor's response log-probs before the update, ``(bs, R)`` (verl recomputes them once
        per step; needed when a step takes more than one optimiser step)."""
        old = torch.zeros(batch.batch["response_mask"].shape, dtype=torch.float32)
        with torch.no_grad():
            for idx in self.micro_batches(batch):
                old[idx] = self.forward(self.policy, batch, idx).float()
        return old

    def backward(self, batch, old: torch.Tensor | None = None, rows: Sequence[int] | None = None) -> dict[str, float]:
        """Zero the gradients, then accumulate those of verl's PPO loss + beta * KL over ``rows`` of
        ``batch`` (default: every row), one token-mean over their loss tokens.

        ``old``: log-probs before the update (:meth:`old_log_probs`; None: on-policy, the current
        ones detached, so the ratio is 1 as in verl's single-step update).
        """
        rows = list(range(len(batch))) if rows is None else list(rows)
        mask = batch.batch["response_mask"].float()
        advantages = batch.batch["advantages"].float()
        total_tokens = int(mask[rows].sum())
        actor = self.cfg.actor_rollout_ref.actor
        loss_cfg = actor_loss_config(self.cfg, total_tokens)
        beta = float(actor.kl_loss_coef) if actor.get("use_kl_loss", True) else 0.0
        agg_mode = str(actor.loss_agg_mode)
        sums: dict[str, float] = {"actor/adv_abs_mean": float((advantages[rows].abs() * mask[rows]).sum()) / max(total_tokens, 1)}
        self.optimizer.zero_grad(set_to_none=True)
        if total_tokens == 0:
            return sums
        self.policy.model.train()
        try:
            for idx in self.micro_batches(batch, rows):
                with torch.no_grad():
                    ref = self.forward(self.reference, batch, idx)
                logp, ent = self.forward(self.policy, batch, idx, entropy=True)
                m, a = mask[idx], advantages[idx]
                old_logp = old[idx] if old is not None else logp.detach()
                pg_loss, pg_metrics = compute_policy_loss_vanilla(old_logp, logp, a, m, loss_agg_mode=agg_mode, config=loss_cfg)
                kl = kl_penalty(logp, ref, actor.kl_loss_type)
                kl_loss = agg_loss(kl, m, agg_mode, batch_num_tokens=total_tokens)
                loss = pg_loss + beta * kl_loss
                loss.backward()
                share = float(m.sum()) / total_tokens
                rollout_lp = batch.batch["rollout_log_probs"][idx]
                for name, value in (
                    ("actor/pg_loss", float(pg_loss.detach())),
                    ("actor/kl_loss", float(kl_loss.detach())),
                    ("actor/loss", float(loss.detach())),
                    ("actor/entropy", float((ent * m).sum()) / total_tokens),
                    ("actor/rollout_logprob_abs_diff", float(((logp.detach() - rollout_lp).abs() * m).sum()) / total_tokens),
                    *((k, v * share) for k, v in pg_metrics.items()),
                ):
                    sums[name] = sums.get(name, 0.0) + value
        finally:
            self.policy.model.eval()
        return sums

    # -- the loop -------------------------------------------------------------------------------------

    def fit(
        self,
        task_stream: Callable[[int], Sequence[Task]],
        log: Callable[[dict], None] | None = None,
        start_step: int = 0,
        on_step: Callable[[int, dict], None] | None = None,
    ) -> list[dict]:
        """Steps ``start_step .. rl.steps - 1``; ``task_stream(step)`` gives the step's B questions.

        ``on_step(step, metrics)`` runs after each step (the job's checkpoints). A resumed run
        (``start_step`` > 0 after :meth:`load_checkpoint`) samples exactly what an uninterrupted one
        would: rollout seeds derive from ``(seed, step, question, index)``.
        """
        for step in range(start_step, self.rl.steps):
            metrics = self.step(task_stream(step), step)
            if log is not None:
                log(metrics)
            if on_step is not None:
                on_step(step, metrics)
        return self.history

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, step: int) -> Path:
        """Policy weights, optimizer state, the next step and the history so far (atomic rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": self.policy.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "next_step": int(step) + 1, "history": self.history}, tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore a :meth:`save_checkpoint` file; returns the step to continue from."""
        state = torch.load(Path(path), map_location="cpu", weights_only=False)
        self.policy.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        sync_weights(self.workflow.engine, self.policy.model)
        return int(state["next_step"])


def padded_token_batches(rows: Sequence[int], lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """``rows`` sorted by length (longest first) and cut so that each micro-batch holds at most
    ``max_rows`` rows and (rows x its longest row) <= ``max_tokens`` padded tokens (a row longer than
    ``max_tokens`` goes alone). The padded forward costs about its padded tokens."""
    out: list[list[int]] = []
    longest = 0  # of the micro-batch being filled: the first row placed in it (rows come longest first)
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * longest <= max_tokens:
            out[-1].append(rows[i])
        else:
            out.append([rows[i]])
            longest = lengths[i]
    return out


def trim_to_loss(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, prompt_width: int,
                 multi_modal_inputs: list | None, image_pad_id: int, merge_size: int) -> tuple[torch.Tensor, list | None]:
    """The attention mask cut after each row's last loss token, and each row's vision inputs cut to
    the images whose tokens remain (images come in token order: ``pixel_values`` rows per image =
    the product of its ``image_grid_thw``, tokens per image = that / merge_size**2). A row with no
    loss token keeps everything (the trainer skips it or it adds nothing)."""
    attention = attention_mask.clone()
    has_loss = response_mask.sum(-1) > 0
    last = response_mask.shape[1] - 1 - torch.flip(response_mask, dims=[1]).argmax(-1)  # last loss column per row
    cols = torch.arange(response_mask.shape[1]).unsqueeze(0)
    cut = has_loss.unsqueeze(1) & (cols > last.unsqueeze(1))
    attention[:, prompt_width:] = attention[:, prompt_width:].masked_fill(cut, 0)
    if multi_modal_inputs is None:
        return attention, None
    trimmed = []
    for i, inputs in enumerate(multi_modal_inputs):
        if not inputs or "image_grid_thw" not in inputs or not bool(cut[i].any()):
            trimmed.append(inputs)
            continue
        kept_tokens = int(((input_ids[i] == image_pad_id) & attention[i].bool()).sum())
        grids = inputs["image_grid_thw"]
        per_image = (grids.prod(-1) // merge_size**2).tolist()
        n, seen = 0, 0
        while n < len(per_image) and seen + per_image[n] <= kept_tokens:
            seen += per_image[n]
            n += 1
        if seen != kept_tokens:
            raise ValueError(f"row {i}: {kept_tokens} image tokens kept do not end on an image boundary {per_image}")
        rows = int(grids[:n].prod(-1).sum())
        row = dict(inputs)
        row["image_grid_thw"], row["pixel_values"] = grids[:n], inputs["pixel_values"][:rows]
        trimmed.append(row)
    return attention, trimmed


def rl_config_from(cfg: DictConfig, **overrides: Any) -> RLConfig:
    """An :class:`RLConfig` from a ``rl`` node (unknown keys are an error)."""
    node = dict(OmegaConf.to_container(cfg, resolve=True)) if cfg is not None else {}
    return dataclass_from_mapping(RLConfig, {**node, **overrides}, "rl config")


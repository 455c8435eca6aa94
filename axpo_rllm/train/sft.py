"""SFT on demonstration trajectories (the stage before AXPO): assistant turns and the real tool
observations between them, tokenised as the agent would hold them, trained with −log p on the
assistant tokens. The demonstrations themselves come from elsewhere (the embedded default's
programmatic teacher: :mod:`axpo_rllm.demo.teacher`).

Token-exact with the agent: the prompt, the observation turns and the turn boundaries are built by
:class:`~axpo_rllm.agents.agent.ChatFormat`, the class the agent renders rollouts with, and the
tool observations come from running the real tools through
:class:`~axpo_rllm.envs.env.MultimodalToolEnv`. The loss covers the assistant tokens, the closing
``<|im_end|>`` of an answer turn included (an untrained model never stops otherwise,
docs/upstream.md §2b); observation tokens are context only.

:func:`tokenizer_corpus` renders teacher conversations as text, so that the tiny tokenizer can be
retrained on the project's own prompts (the fixed system/tools text becomes a few tokens).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

import torch

from axpo_rllm.agents.chat_format import ChatFormat
from axpo_rllm.agents.parsing import THINK_OPEN, TurnKind, parse_turn_text
from axpo_rllm.core.records import Task
from axpo_rllm.engines.base import GenerationRequest
from axpo_rllm.envs.verifiers import extract_boxed
from axpo_rllm.train.actor import Policy, response_logprobs

__all__ = [
    "SFTConfig",
    "TeacherTrajectory",
    "SFTExample",
    "tokenize_trajectory",
    "tokenizer_corpus",
    "train_sft",
    "first_turn_stats",
]

@dataclass(frozen=True)
class SFTConfig:
    examples: int = 2000
    """Teacher trajectories to train on (train split)."""
    max_steps: int = 10_000
    minutes: float = 4.0
    """Wall-clock budget; training stops at whichever of max_steps / minutes comes first."""
    batch_size: int = 16
    lr: float = 3e-3
    """Peak learning rate, decayed linearly to 10% over the planned steps (docs/upstream.md §2b)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10


@dataclass(frozen=True)
class TeacherTrajectory:
    """What the teacher did on a task: assistant texts and the real tool observations between them."""

    task: Task
    turns: tuple[str, ...]
    """Assistant turn texts (a tool turn ends at ``</tool_call>``)."""
    observations: tuple[tuple[str, tuple[Any, ...]], ...]
    """One ``(model_text, images)`` per tool turn: what the env handed back."""

    @property
    def uses_tool(self) -> bool:
        return bool(self.observations)


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    loss_mask: np.ndarray
    """1 on the teacher's tokens (assistant turns, answer turns' ``<|im_end|>``), 0 on observations."""
    images: tuple[Any, ...]
    uses_tool: bool


def tokenize_trajectory(traj: TeacherTrajectory, chat: ChatFormat, tool_schemas: list[dict], system_prompt: str | None) -> SFTExample:
    """Token ids exactly as the agent would hold them had it produced this trajectory.

    Every assistant turn ends with ``<|im_end|>``, trained: the agent's turns run to end-of-turn
    (a model that never learns it after a call or an answer never stops)."""
    prompt = chat.prompt_ids(traj.task, tool_schemas, system_prompt)
    eos = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids: list[int] = []
    mask: list[int] = []
    images = list(traj.task.images)
    for i, text in enumerate(traj.turns):
        if chat.think_open and text.startswith(THINK_OPEN):  # the generation prompt already opened it
            text = text[len(THINK_OPEN):].lstrip("\n")
        turn = chat.encode(text) + [eos]
        ids += turn
        mask += [1] * len(turn)
        if i < len(traj.observations):
            obs_text, obs_images = traj.observations[i]
            obs = chat.observation_ids([(obs_text, len(obs_images))], ids[-1])
            ids += obs
            mask += [0] * len(obs)
            images += list(obs_images)
    return SFTExample(np.asarray(prompt, np.int64), np.asarray(ids, np.int64), np.asarray(mask, np.int8), tuple(images), traj.uses_tool)


def tokenizer_corpus(trajectories: Sequence[TeacherTrajectory], chat: ChatFormat, tool_schemas: list[dict], system_prompt: str | None) -> list[str]:
    """The rendered conversations as plain text (control tokens dropped), for BPE training."""
    out = []
    for traj in trajectories:
        ex = tokenize_trajectory(traj, chat, tool_schemas, system_prompt)
        out.append(chat.tokenizer.decode(list(ex.prompt_ids) + list(ex.response_ids), skip_special_tokens=True))
    return out


def _batch_loss(policy: Policy, batch: Sequence[SFTExample]):
    logp = response_logprobs(policy, [e.prompt_ids for e in batch], [e.response_ids for e in batch], [e.images for e in batch])
    mask = torch.zeros_like(logp)
    for i, e in enumerate(batch):
        mask[i, : len(e.loss_mask)] = torch.from_numpy(e.loss_mask.astype(np.float32))
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def train_sft(
    policy,
    examples: Sequence[SFTExample],
    config: SFTConfig = SFTConfig(),
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """AdamW on the teacher tokens; returns the per-step history (``step``, ``loss``, ``lr``, ``elapsed_s``)."""
    if not examples:
        raise ValueError("train_sft needs at least one example")
    model = policy.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    order: list[int] = []
    history: list[dict] = []
    start = time.perf_counter()
    deadline = start + 60 * config.minutes
    planned = config.max_steps
    step = 0
    try:
        while step < config.max_steps and time.perf_counter() < deadline:
            if len(order) < config.batch_size:
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order += fresh
            batch = [examples[i] for i in order[: config.batch_size]]
            del order[: config.batch_size]
            # Linear decay to 10% over the steps the time budget allows (estimated from the pace so far).
            elapsed = time.perf_counter() - start
            if step >= 3:
                planned = min(config.max_steps, max(step + 1, int(step * 60 * config.minutes / max(elapsed, 1e-6))))
            lr = config.lr * max(0.1, 1.0 - step / max(planned, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = _batch_loss(policy, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            step += 1
            record = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr, "elapsed_s": time.perf_counter() - start}
            history.append(record)
            if log is not None and (step % config.log_every == 0 or step == 1):
                log(record)
    finally:
        model.eval()
    return history


def eval_loss(policy, examples: Sequence[SFTExample], batch_size: int = 16) -> float:
    """Mean teacher-token loss over ``examples`` (no gradient)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            tokens = sum(int(e.loss_mask.sum()) for e in batch)
            total += float(_batch_loss(policy, batch)) * tokens
            count += tokens
    return total / max(count, 1)


def first_turn_stats(engine, chat, tasks: Sequence[Task], tool_schemas: list[dict], tool_names: Sequence[str],
                     system_prompt: str | None, max_tokens: int = 96, temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Sample one first turn per task and report what the policy writes.

    ``well_formed``: ``<think>…</think>`` closed, then exactly one valid call to a known tool, or a
    ``\\boxed{}`` answer that ends the turn (EOS). ``tool_call_share``: turns that open a call
    (valid or not; a malformed call is still tool use, as in the agent).
    """
    requests = [
        GenerationRequest(
            prompt_ids=tuple(chat.prompt_ids(t, tool_schemas, system_prompt)), images=t.images, max_tokens=max_tokens,
            temperature=temperature, seed=seed * 100_003 + i, request_id=f"first-turn-{i}",
        )
        for i, t in enumerate(tasks)
    ]

    async def run():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    results = asyncio.run(run())
    well, calls, lengths = 0, 0, []
    for res in results:
        text = chat.decode(res.token_ids)
        parsed = parse_turn_text(text, tool_names, think_open=chat.think_open)
        lengths.append(len(res.token_ids))
        if parsed.kind is not TurnKind.ANSWER:
            calls += 1
        if not parsed.think_closed or (THINK_OPEN not in text and not chat.think_open):
            continue
        if parsed.kind is TurnKind.TOOL_CALL:
            well += 1
        elif parsed.kind is TurnKind.ANSWER and res.finish_reason == "stop" and extract_boxed(parsed.answer) is not None:
            well += 1
    n = max(len(results), 1)
    return {"well_formed": well / n, "tool_call_share": calls / n, "mean_tokens": float(np.mean(lengths)) if lengths else math.nan}

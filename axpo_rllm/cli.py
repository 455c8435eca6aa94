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
import os
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator, Sequence

from axpo_rllm import __version__
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
        from axpo_rllm.demo.time_model import run_cli

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
    p.add_argument("--r", type=float, default=0.25, help="extra-sample ratio: E = floor(r·B·N)")
    p.add_argument("--k", type=int, default=4, help="K, continuations per selected prefix")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also vary r, K and N one at a time (a second table)")
    p.add_argument("--sweep-steps", type=int, default=0, help="steps per sweep point (default: --steps)")
    p.add_argument("--png", default="axpo-simulator.png", help="where to write the figure ('' for none)")
    p.add_argument("--time", default="", metavar="PROFILE",
                   help="wall-clock model instead (docs/time_model.md): a GPU profile (h100-8b, ...) or a step-profile JSON")
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


def _percentiles(values: list[int]) -> str:
    import numpy as np

    if not values:
        return "—"
    lo, mid, hi = np.percentile(values, [0, 50, 100])
    return f"{int(lo)} / {int(mid)} / {int(hi)}"


def data_inspect(args: argparse.Namespace) -> int:
    """Rows, sources and their verifiers, answer kinds, image sizes; bad rows named (or counted)."""

    from rich.console import Console
    from rich.table import Table

    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows

    console = Console(soft_wrap=True)  # long paths and messages stay whole lines (greppable)
    report = LoadReport()
    per_source: dict[str, Counter] = defaultdict(Counter)
    how: dict[str, Counter] = defaultdict(Counter)
    kinds: Counter = Counter()
    images_per_row: Counter = Counter()
    widths, heights, formats = [], [], Counter()
    decode_failures = 0
    try:
        for row in read_rows(args.files, report=report, **_load_kwargs(args)):
            per_source[row.source][row.kind] += 1
            how[row.source][row.kind_how] += 1
            kinds[row.kind] += 1
            images_per_row[len(row.images)] += 1
            for info in row.image_info:
                widths.append(info.width)
                heights.append(info.height)
                formats[info.format] += 1
            if args.decode:
                try:
                    row.task()
                except DataError as e:
                    if not args.skip_bad:
                        raise
                    report.reject(e)
                    decode_failures += 1
    except (DataError, ValueError) as e:
        return _fail("data inspect", e, _SKIP_HINT if isinstance(e, DataError) else "")
    table = Table(title=f"{', '.join(map(str, args.files))}: {report.rows_ok} rows")
    for col in ("data_source", "rows", "answer kinds", "verifier resolved by"):
        table.add_column(col)
    for source in sorted(per_source):
        table.add_row(source, str(sum(per_source[source].values())),
                      ", ".join(f"{k} {n}" for k, n in per_source[source].most_common()),
                      ", ".join(f"{k} ({n})" for k, n in how[source].most_common()))
    console.print(table)
    console.print("answer kinds: " + (", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "—"))
    console.print("images per row: " + (", ".join(f"{k}: {n} rows" for k, n in sorted(images_per_row.items())) or "—"))
    console.print(f"image width min/median/max: {_percentiles(widths)}; height: {_percentiles(heights)}; formats: "
                  + (", ".join(f"{k} {n}" for k, n in formats.most_common()) or "—")
                  + ("" if args.decode else " (headers only; --decode decodes every image)"))
    _print_report(console, report)
    if args.json:
        summary = {"report": report.as_dict(), "sources": {s: dict(c) for s, c in per_source.items()},
                   "verifier_resolution": {s: dict(c) for s, c in how.items()}, "answer_kinds": dict(kinds),
                   "images_per_row": {str(k): v for k, v in images_per_row.items()},
                   "image_width": widths and [min(widths), max(widths)], "image_height": heights and [min(heights), max(heights)],
                   "image_formats": dict(formats), "decode_failures": decode_failures}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
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


def _file_stamp(path: str) -> dict:

    p = os.path.abspath(path)
    st = os.stat(p)
    return {"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _json_safe(value):
    """NaN (a rate with nothing to count) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _tool_configs(text: str | None) -> dict:

    if not text:
        return {}
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--tool-config must be JSON ({{\"search\": {{\"base_url\": ...}}}}) or @FILE: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--tool-config must be a JSON object mapping tool names to their settings")
    return value


def run_eval(args: argparse.Namespace) -> int:
    """Pass@1 / Pass@k per benchmark on data files, resumable, with a markdown table and JSON."""

    from rich.console import Console

    from axpo_rllm.agents.agent import AgentConfig
    from axpo_rllm.agents.chat_format import ChatFormat
    from axpo_rllm.data.loaders import DataError, LoadReport, read_rows
    from axpo_rllm.engines.base import EngineError
    from axpo_rllm.envs.env import MultimodalToolEnv, build_tools, run_sync
    from axpo_rllm.envs.tools.registry import ToolDiscoveryError
    from axpo_rllm.train.evaluate import EvalItem, build_engine, evaluate_items, markdown_table

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
        tool_names = [t for t in args.tools.split(",") if t] if args.tools else []
        tools = build_tools(tool_names, _tool_configs(args.tool_config))
    except (DataError, ValueError, ToolDiscoveryError) as e:
        return _fail("eval", e, _SKIP_HINT if isinstance(e, DataError) else "")
    console.print(f"{len(items)} questions of {len(per_source)} benchmarks ({report.summary()}); engine {args.engine}, "
                  f"n={args.n}, k={args.k}, output {out}")
    engine = None
    try:
        options = {"threads": args.threads} if args.engine == "transformers" and args.threads else {}
        engine = build_engine(args.engine, args.model_dir, base_url=args.base_url, **options)
        from transformers import AutoTokenizer  # the chat template lives with the model (every engine)

        chat = ChatFormat(getattr(engine, "tokenizer", None) or AutoTokenizer.from_pretrained(args.model_dir))

        def env():
            return MultimodalToolEnv(tools=tools)

        schemas = env().tool_schemas()
        fingerprint = {"model_dir": str(Path(args.model_dir).resolve()), "engine": args.engine, "base_url": args.base_url,
                       "files": [_file_stamp(f) for f in args.files], "source": args.source, "verifier": sorted(args.verifier),
                       "split": args.split, "limit": args.limit, "tools": tool_names, "tool_schemas": schemas,
                       "tool_config": _tool_configs(args.tool_config), "skip_bad": args.skip_bad}
        result = evaluate_items(engine, chat, env, items, n=args.n, k=args.k, agent_config=agent, seed=args.seed, out_dir=out,
                                fingerprint=fingerprint, fresh=args.fresh, record=args.record, skip_bad=args.skip_bad,
                                progress=not args.no_progress, max_concurrency=args.max_concurrency)
    except (EngineError, OSError) as e:  # no vLLM here, no server there, no model folder
        return _fail("eval", e)
    except KeyboardInterrupt:
        print(f"\naxpo-rllm eval: interrupted; finished samples are kept in {out / 'samples.jsonl'}: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except (DataError, ValueError) as e:
        return _fail("eval", e, _SKIP_HINT if isinstance(e, DataError) else "")
    finally:
        if engine is not None:
            engine.close()
        for tool in tools.values():
            try:
                run_sync(tool.aclose())
            except Exception:  # noqa: BLE001 - a tool's teardown must not hide the result
                pass
    table = markdown_table(result.scores)
    (out / "results.md").write_text(table)
    payload = {"scores": result.scores, "load_report": report.as_dict(), "skipped_questions": result.skipped,
               "resumed_samples": result.resumed, "samples": len(result.samples)}
    (out / "results.json").write_text(json.dumps(_json_safe(payload), indent=2))
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
        launcher._import_rllm()
        cfg = launcher.launch_config(args.ablation, args.overrides, base=launcher.compose_rllm_base(), model=args.model)
    except launcher.RllmMissing as exc:
        print(f"axpo-rllm train: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"axpo-rllm train: {exc}", file=sys.stderr)
        return 2
    train_set, val_set = _registered_files(cfg)
    return launcher.run(cfg, train_set, val_set)


def _registered_files(cfg):
    """``data.train_files`` / ``data.val_files`` (any format ``axpo-rllm data`` reads) registered in
    rllm's dataset registry as ``axpo-<stem>``; (None, None) when the run names registered datasets."""

    from omegaconf import OmegaConf
    from rllm.data.dataset import DatasetRegistry  # type: ignore[import-not-found]  # needs rllm

    from axpo_rllm.data.loaders import load_rows
    from axpo_rllm.data.writers import register_rllm

    out = []
    for key, split in (("data.train_files", "train"), ("data.val_files", "test")):
        files = OmegaConf.select(cfg, key, default=None)
        files = [files] if isinstance(files, str) else list(files or [])
        if not files or not all(Path(str(f)).exists() for f in files):
            out.append(None)
            continue
        rows, _ = load_rows([str(f) for f in files])
        name = "axpo-" + "-".join(Path(str(f)).stem for f in files)[:64]
        register_rllm(rows, name, split=split)
        out.append(DatasetRegistry.load_dataset(name, split))
    return (out[0], out[1]) if out[0] is not None else (None, None)


def add_train_parser(sub) -> None:
    p = _command(sub, "train", "an rllm training run with AXPO (--dry-run: check on CPU)",
                 "Composes rllm's config, the AXPO layer, a shipped model layer and your key=value\n"
                 "overrides, checks them, and runs rllm's AgentTrainer (backend verl) with AXPO's workflow\n"
                 "and advantage estimator. --ablation grpo gives the GRPO baseline.",
                 "axpo-rllm train --model qwen3_vl_4b_thinking data.train_files=rl.parquet --dry-run")
    p.add_argument("--ablation", default=None, help="grpo, no_prefix_fix, ... (configs/ablation)")
    p.add_argument("--model", default=None, help="a shipped model layer: qwen3_vl_2b_thinking, qwen3_vl_4b_thinking, qwen3_vl_8b_thinking")
    p.add_argument("--dry-run", action="store_true", help="compose and validate the whole config without a GPU, print it")
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
                 "and summary.md. 10-18 minutes on 2 CPU cores; --smoke makes every stage tiny.",
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

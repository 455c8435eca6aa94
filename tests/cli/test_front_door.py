"""What a newcomer sees of the command line: --version, help written for users, and quiet commands
(other libraries' warnings, log lines and progress bars hidden; -v shows them)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import warnings

import pytest

from axpo_rllm import cli

COMMANDS = (["main"], ["train"], ["eval"], ["data"], ["data", "inspect"], ["data", "convert"],
            ["data", "filter"], ["data", "sft-export"], ["simulate"], ["plan-demo"])


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "axpo_rllm.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100", **(env or {})})


def test_version_is_the_installed_distributions():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"axpo-rllm {importlib.metadata.version('axpo-rllm')}"


def help_text(*command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "top")
def test_help_is_for_users_with_an_example_and_fits_100_columns(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_text(*command, capsys=capsys)
    for developer_note in ("``", "Layer", "layer 7", ":func:", ":class:"):
        assert developer_note not in text, developer_note
    assert all(len(line) <= 100 for line in text.splitlines())
    if command:
        usage, description = text.split("\n\n")[:2]
        assert description.strip() and not description.lstrip().startswith(("positional", "options"))
        example = text.split("example:\n", 1)[1].strip()
        assert example.startswith("axpo-rllm " + " ".join(command)), example
    else:
        assert "Run 'axpo-rllm COMMAND --help'" in text and "-v, --verbose" in text
        for name in ("main", "train", "eval", "data", "simulate", "plan-demo"):
            assert f"\n    {name} " in text, name


@pytest.mark.parametrize("argv", [["-v", "plan-demo"], ["plan-demo", "-v"], ["plan-demo", "--verbose"]])
def test_verbose_before_or_after_the_command_reaches_the_quiet_switch(argv, monkeypatch):
    seen = []
    real = cli.quiet_third_party

    def spy(verbose=False):
        seen.append(verbose)
        return real(verbose)

    monkeypatch.setattr(cli, "quiet_third_party", spy)
    monkeypatch.setattr(cli, "plan_demo", lambda args: 0)
    assert cli.main([*argv, "--questions", "4"]) == 0
    assert seen == [True]
    seen.clear()
    assert cli.main(["plan-demo", "--questions", "4"]) == 0
    assert seen == [False]


def test_quiet_hides_other_libraries_warnings_and_logs_but_not_ours(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    for name in ("verl.workers.engine", "axpo_rllm.envs.env"):
        logging.getLogger(name).addHandler(handler)
    verl_logger = logging.getLogger("verl.workers.engine")
    verl_logger.setLevel(logging.INFO)  # as verl sets its module loggers (VERL_LOGGING_LEVEL)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with cli.quiet_third_party(verbose=False):
                assert os.environ["TQDM_DISABLE"] == "1" and os.environ["VERL_LOGGING_LEVEL"] == "ERROR"
                warnings.warn_explicit("engine is not available", UserWarning, "engine.py", 1, module="verl.workers.engine")
                warnings.warn_explicit("rows with images", UserWarning, "batch.py", 1, module="axpo_rllm.integrations.verl.batch")
                verl_logger.warning("no accelerator")
                logging.getLogger("axpo_rllm.envs.env").warning("tool crashed")
            assert [str(w.message) for w in shown] == ["rows with images"]
            assert [r.getMessage() for r in records] == ["tool crashed"]
            assert verl_logger.level == logging.INFO and "TQDM_DISABLE" not in os.environ  # all restored
            records.clear()
            with cli.quiet_third_party(verbose=True):
                warnings.warn_explicit("engine is not available", UserWarning, "engine.py", 1, module="verl.workers.engine")
                verl_logger.warning("no accelerator")
            assert str(shown[-1].message) == "engine is not available"
            assert [r.getMessage() for r in records] == ["no accelerator"]
    finally:
        for name in ("verl.workers.engine", "axpo_rllm.envs.env"):
            logging.getLogger(name).removeHandler(handler)
        verl_logger.setLevel(logging.NOTSET)


PROBE = """
import sys
from axpo_rllm.cli import quiet_third_party
with quiet_third_party(verbose=sys.argv[1] == "verbose"):
    import verl.workers.engine  # warns about every optional engine it cannot load
    from transformers.utils import logging as hf_logging
    print("progress bars", hf_logging.is_progress_bar_enabled())
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_a_fresh_process_hears_verl_and_hf_bars_only_when_verbose(mode):
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in cli.QUIET_ENV})
    assert proc.returncode == 0, proc.stderr[-2000:]
    if mode == "quiet":
        assert "progress bars False" in proc.stdout and "Warning" not in proc.stderr, proc.stderr[-2000:]
    else:
        assert "progress bars True" in proc.stdout and "UserWarning: megatron engine is not available" in proc.stderr


class _RemoteError(Exception):
    """What a Ray task error looks like to the driver: its text opens with the remote function, its
    ``cause`` is the remote exception (Ray's dual exception classes keep no other attribute)."""

    def __init__(self, text: str, cause: BaseException) -> None:
        super().__init__(text)
        self.cause = cause


def test_a_failed_run_is_summed_up_by_its_innermost_remote_function_and_cause():
    disk = RuntimeError("basic_ios::clear: iostream error")
    worker = _RemoteError("\x1b[36mray::WorkerDict.actor_rollout_ref_save_checkpoint()\x1b[39m (pid=1)", disk)
    trainer = _RemoteError("\x1b[36mray::VerlTaskRunner.run()\x1b[39m (pid=2)", worker)
    assert cli._root_cause(trainer) == ("WorkerDict.actor_rollout_ref_save_checkpoint", disk)
    # as it reaches the driver: the trainer's text nests the worker's, the cause is the bare error
    flat = _RemoteError("\x1b[36mray::VerlTaskRunner.run()\x1b[39m (pid=2)\n  ...\nRayTaskError(RuntimeError): "
                        "\x1b[36mray::WorkerDict.actor_rollout_ref_save_checkpoint()\x1b[39m (pid=1)", disk)
    assert cli._root_cause(flat) == ("WorkerDict.actor_rollout_ref_save_checkpoint", disk)
    local = ValueError("no remote frame")
    assert cli._root_cause(local) == ("", local)

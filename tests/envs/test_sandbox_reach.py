"""The python sandbox wherever Python lives, and the floor it never silently drops below.

Two common places that a sandbox once could not reach: a venv under ``/tmp`` (a CI clone, a scratch
checkout; bwrap gives each call a fresh ``/tmp``) and an interpreter under a ``0700`` home (pyenv,
conda, uv in ``~``: a private uid cannot read it). Both are built here from this interpreter's
own files (hard links where the file system allows, else copies), and a sandbox run by that venv's
Python must reach them at ``bwrap`` and at ``unshare``, with a private uid per call when the
trainer is root, showing nothing else of the home or the checkout and nothing writable.

The floor: below ``min_isolation`` / ``private_uid`` the pool and the tool refuse to start, naming
what is missing and the fix. "No bwrap" is a ``PATH`` without it (nothing is uninstalled).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from axpo_rllm.envs.tools import python_code
from axpo_rllm.envs.tools.python_code import PythonCodeTool
from axpo_rllm.envs.tools.sandbox import (Isolation, IsolationBelowFloor, SandboxPool, check_floor, detect_isolation,
                                         meets_floor)

SANDBOX_SOURCE = Path(__file__).resolve().parents[2] / "envs" / "tools" / "sandbox" / "__init__.py"
ROOT = os.geteuid() == 0
HAS_BWRAP = shutil.which("bwrap") is not None
LIBRARIES = ("pil", "numpy")
"""What the sandbox's worker imports from the venv (``PIL``, ``pillow.libs``, ``numpy``, ...)."""


def link_tree(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """``source`` rebuilt at ``target``: directories made, files hard-linked (copied across file
    systems), symlinks kept; directories named in ``skip`` left out."""
    for folder, dirs, files in os.walk(source):
        here = target / Path(folder).relative_to(source)
        here.mkdir(parents=True, exist_ok=True)
        for name in list(dirs):
            if name in skip:
                dirs.remove(name)
            elif (Path(folder) / name).is_symlink():
                dirs.remove(name)
                os.symlink(os.readlink(Path(folder) / name), here / name)
        for name in files:
            path = Path(folder) / name
            if path.is_symlink():
                os.symlink(os.readlink(path), here / name)
                continue
            link_or_copy(path, here / name)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or a file a non-root user may not link
        shutil.copy2(source, target)


def build_interpreter(home: Path) -> Path:
    """This interpreter's binary, libpython and standard library under ``home``: its new base prefix."""
    base = Path(sys.base_prefix).resolve()
    binary = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                      "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix})
    stdlibs = {Path(paths["stdlib"]).resolve(), Path(paths["platstdlib"]).resolve()}
    if not (binary.is_relative_to(base) and all(p.is_relative_to(base) for p in stdlibs)):
        pytest.skip(f"this interpreter ({binary}) does not keep its standard library under its prefix {base}")
    prefix = home / "python"
    (prefix / binary.parent.relative_to(base)).mkdir(parents=True)
    link_or_copy(binary, prefix / binary.relative_to(base))
    for library in (base / "lib").glob("libpython*"):
        (prefix / "lib").mkdir(exist_ok=True)
        shutil.copy2(library, prefix / "lib" / library.name, follow_symlinks=False)
    for stdlib in stdlibs:
        link_tree(stdlib, prefix / stdlib.relative_to(base), skip=("site-packages", "dist-packages", "test", "idlelib",
                                                                    "tkinter", "turtledemo"))
    return prefix / binary.relative_to(base)


def build_venv(python: Path, where: Path) -> Path:
    """A venv of ``python`` at ``where`` with PIL and numpy (linked from this venv): its python."""
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True)
    venv_python = where / "bin" / "python"
    site = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = Path(Image.__file__).resolve().parents[1]
    for entry in ours.iterdir():
        if entry.name.lower().startswith(LIBRARIES):
            if entry.is_dir():
                link_tree(entry, Path(site) / entry.name)
            else:
                shutil.copy2(entry, Path(site) / entry.name)
    return venv_python


@pytest.fixture(scope="module")
def placed():
    """A checkout under /tmp (in a 0700 directory, as mkdtemp makes it) whose venv's interpreter
    lives under a 0700 home; a secret file in each that no call may see."""
    top = Path(tempfile.mkdtemp(prefix="axpo-reach-", dir="/tmp"))
    try:
        home, clone = top / "home", top / "clone"
        home.mkdir(mode=0o700)
        clone.mkdir(mode=0o700)
        python = build_interpreter(home)
        venv_python = build_venv(python, clone / ".venv")
        secrets = [home / "secret.txt", clone / "secret.txt"]
        for secret in secrets:
            secret.write_text("not for sandboxed code")
        yield {"home": home, "clone": clone, "venv_python": venv_python, "base": python.parents[1],
               "secrets": [str(s) for s in secrets]}
    finally:
        shutil.rmtree(top, ignore_errors=True)


DRIVER = r"""
import importlib.util, json, sys

spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
level, start, call = sys.argv[2], sys.argv[3], sys.argv[4]
if level == "floor":
    try:
        sandbox.SandboxPool(min_isolation="bwrap", private_uid=True, start=start).close()
        print(json.dumps({"refused": ""}))
    except sandbox.IsolationBelowFloor as exc:
        print(json.dumps({"refused": str(exc)}))
    sys.exit(0)
isolation = sandbox.detect_isolation(level, start)
limits = sandbox.SandboxLimits(timeout_s=30, python_guard=False)
with sandbox.SandboxPool(limits, size=1, isolation=level, start=start) as pool:
    result = pool.run(call)
print(json.dumps({"level": isolation.level, "own_uid": isolation.own_uid, "detail": isolation.detail,
                  "stdout": result.stdout, "error": result.error, "stderr": result.stderr}))
"""

CALL = """
import json, os, sys
sys.modules.pop('colorsys', None)
import colorsys                 # the standard library, read afresh by the call's uid
import PIL.ImageMorph, numpy    # the venv's packages (ImageMorph: not imported ahead by the worker)
try:
    open(os.path.join(os.path.dirname(numpy.__file__), 'planted.py'), 'w').close()
    wrote = 'yes'
except OSError as exc:
    wrote = type(exc).__name__
print(json.dumps({"uid": os.getuid(), "seen": [p for p in SECRETS if os.path.exists(p)], "wrote": wrote,
                  "prefix": sys.prefix, "base_prefix": sys.base_prefix, "sum": int(numpy.arange(5).sum())}))
"""


def drive(placed: dict, level: str, start: str, env: dict | None = None) -> dict:
    call = f"SECRETS = {placed['secrets']!r}\n" + CALL
    done = subprocess.run([str(placed["venv_python"]), "-c", DRIVER, str(SANDBOX_SOURCE), level, start, call],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("start", ["fork", "spawn"])
@pytest.mark.parametrize("level", ["bwrap", "unshare"])
def test_a_venv_under_tmp_and_an_interpreter_under_a_private_home_are_reached(placed, level, start):
    if level == "bwrap" and not HAS_BWRAP:
        pytest.skip("bwrap is not installed")
    if level == "unshare" and not (ROOT and shutil.which("unshare")):
        pytest.skip("unshare needs root and util-linux")
    out = drive(placed, level, start)
    assert (out["level"], out["own_uid"]) == (level, ROOT), out["detail"]
    assert not out["error"], (out["error"], out["stderr"])
    seen = json.loads(out["stdout"])
    assert seen["sum"] == 10 and seen["prefix"] == str(placed["clone"] / ".venv")
    assert seen["base_prefix"] == str(placed["base"])  # the interpreter under the 0700 home, not this one
    assert seen["uid"] >= 61000 if ROOT else seen["uid"] == os.getuid()
    assert seen["seen"] == [], "nothing else of the home or the checkout is shown"
    assert seen["wrote"] in ("PermissionError", "OSError"), "the trees are read-only"


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_at_unshare_a_pool_directory_inside_the_private_home_stays_usable(placed, start):
    # TMPDIR inside the 0700 home: the tmpfs that covers the home must bring the pool's own
    # directory (the calls' work dirs, under spawn) back, writable, and nothing else of the home.
    if not (ROOT and shutil.which("unshare")):
        pytest.skip("unshare needs root and util-linux")
    tmpdir = placed["home"] / "tmp"
    tmpdir.mkdir(exist_ok=True)
    out = drive(placed, "unshare", start, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert (out["level"], out["own_uid"]) == ("unshare", True), out["detail"]
    assert not out["error"], (out["error"], out["stderr"])
    assert json.loads(out["stdout"])["seen"] == []


def test_a_private_uid_that_cannot_read_a_package_refuses_a_floor_naming_the_path(placed):
    if not (ROOT and HAS_BWRAP):
        pytest.skip("a private uid needs root; this case needs bwrap")
    site = subprocess.run([str(placed["venv_python"]), "-c", "import PIL, os; print(os.path.dirname(PIL.__file__))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    os.chmod(site, 0o700)
    try:
        out = drive(placed, "floor", "fork")
    finally:
        os.chmod(site, 0o755)
    assert f"{site} (mode 0700, owner uid 0)" in out["refused"], out["refused"]
    assert "below its floor min_isolation='bwrap' with a private uid per call" in out["refused"]


# ------------------------------------------------------------------------------------- the floor


@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    """A PATH without bwrap (nor unshare): what a machine without bubblewrap looks like."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("AXPO_SANDBOX_ISOLATION", raising=False)
    return str(empty)


def test_without_bwrap_a_bwrap_floor_refuses_to_start_naming_the_fix(no_bwrap):
    with pytest.raises(IsolationBelowFloor) as refused:
        SandboxPool(min_isolation="bwrap", private_uid=ROOT)
    message = str(refused.value)
    assert f"no `bwrap` on PATH={no_bwrap}" in message and "apt-get install bubblewrap" in message
    assert "below its floor min_isolation='bwrap'" in message
    assert "runs at" not in message and "strongest isolation that works here is rlimits" in message


def test_a_bwrap_that_cannot_start_refuses_the_floor_with_its_own_words(no_bwrap):
    # The bwrap the trainer's PATH finds is the one run (not one the worker's PATH would find).
    fake = Path(no_bwrap) / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(IsolationBelowFloor) as refused:
        SandboxPool(min_isolation="bwrap")
    message = str(refused.value)
    assert "bwrap did not start" in message and "No permissions to create new namespace" in message
    assert "in a container bwrap needs user namespaces or root" in message


def test_the_tool_refuses_when_it_is_built_not_call_by_call(no_bwrap):
    with pytest.raises(IsolationBelowFloor, match="install bubblewrap"):
        PythonCodeTool(min_isolation="bwrap", private_uid=True)
    tool = PythonCodeTool(min_isolation="rlimits")  # the floor the CPU job allows: it starts
    assert "weaker than the training configs' floor" in tool.describe_isolation()


def test_a_layer_pinned_below_the_floor_is_named(monkeypatch):
    monkeypatch.setenv("AXPO_SANDBOX_ISOLATION", "rlimits")
    with pytest.raises(IsolationBelowFloor, match="pinned by AXPO_SANDBOX_ISOLATION=rlimits"):
        SandboxPool(min_isolation="unshare")
    with pytest.raises(ValueError, match="isolation='rlimits' is below min_isolation='bwrap'"):
        PythonCodeTool(isolation="rlimits", min_isolation="bwrap")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("min_isolation", "docker", "min_isolation='docker', expected one of"),
    ("private_uid", "yes", "private_uid='yes', expected true or false"),
])
def test_a_bad_floor_is_a_config_error(key, value, message):
    with pytest.raises(ValueError, match=message):
        PythonCodeTool(**{key: value})


def test_without_a_floor_building_the_tool_starts_nothing(monkeypatch):
    def no_probe(*_):
        raise AssertionError("a tool without a floor probed the sandbox when it was built")

    monkeypatch.setattr(python_code, "detect_isolation", no_probe)
    assert not PythonCodeTool().has_floor


@pytest.mark.parametrize(("level", "own_uid", "floor", "private_uid", "meets"), [
    ("bwrap", True, "bwrap", True, True),
    ("bwrap", False, "bwrap", True, False),
    ("bwrap", False, "bwrap", False, True),
    ("unshare", True, "bwrap", False, False),
    ("unshare", True, "unshare", True, True),
    ("rlimits", True, "unshare", False, False),
    ("rlimits", False, "rlimits", False, True),
    ("rlimits", False, "rlimits", True, False),
])
def test_the_floor_orders_layers_then_the_private_uid(level, own_uid, floor, private_uid, meets):
    assert meets_floor(level, own_uid, floor, private_uid) is meets
    if meets:
        check_floor(Isolation(level, own_uid), floor, private_uid)
    else:
        with pytest.raises(IsolationBelowFloor):
            check_floor(Isolation(level, own_uid), floor, private_uid)


def test_the_layer_in_force_is_what_detection_found():
    tool = PythonCodeTool()
    assert tool.isolation_in_force() == detect_isolation("auto", "fork")

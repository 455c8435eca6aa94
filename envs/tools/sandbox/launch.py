"""How a sandboxed process is started, whichever the start method: ``_worker.py``'s source run by
``python -I`` behind the layer's command, with an empty environment and a JSON config that holds
no secrets (it is visible in ``ps``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .layers import layer_prefix, python_roots, unshare_mounts
from .results import SandboxLimits

WORKER_SOURCE = (Path(__file__).with_name("_worker.py")).read_text()
"""Run by ``python -I -c`` inside the sandbox: no project file needs to be visible there."""
BLOCKED_EVENTS = (
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.sendto", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at",
    "ctypes.wstring_at", "ctypes.addressof", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "os.setuid", "os.setgid", "os.chroot", "mmap.__new__",
)
"""Audit events the in-process guard refuses (defence in depth: it stops Python code, not native code)."""


def worker_config(level: str, limits: SandboxLimits, tmp_root: str, **extra: Any) -> dict:
    """The JSON config a worker or template gets as ``argv[1]`` (no secrets: it is visible in ``ps``)."""
    config = {
        "mode": "spawn", "level": level, "result_fd": None, "uid": None, "max_processes": limits.max_processes,
        "max_open_files": limits.max_open_files, "file_size_bytes": limits.file_size_mb << 20,
        "memory_bytes": limits.memory_mb << 20, "workdir_bytes": limits.workdir_mb << 20,
        "max_images": limits.max_images, "max_image_pixels": limits.max_image_pixels,
        "max_decode_pixels": limits.max_decode_pixels, "guard": limits.python_guard,
        "blocked_events": BLOCKED_EVENTS, "read_roots": list(python_roots()) + ["/usr/share", "/etc/localtime"],
        "pool": tmp_root,  # names the owning pool in `ps` output
        "mounts": unshare_mounts(tmp_root) if level == "unshare" else None,
    }
    config.update(extra)
    return config


def worker_command(level: str, limits: SandboxLimits, config: dict) -> list[str]:
    """The command line of a spawned worker or a template: the same for both, by design (a
    template is started exactly as a worker is, never forked from the trainer)."""
    return layer_prefix(level, limits) + [sys.executable, "-I", "-u", "-c", WORKER_SOURCE, json.dumps(config)]


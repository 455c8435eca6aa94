"""Faults injected into the end-to-end run (test support; never shipped).

Imported in every process of a run through ``VERL_USE_EXTERNAL_MODULES`` (the harness adds it
only for the fault runs); inert unless ``AXPO_E2E_FAULTS`` holds a plan. The plan is a list of
faults, each fired a bounded number of times at a position the test draws from a seeded RNG; what
fired is appended to ``AXPO_E2E_FAULT_LOG`` (one JSON line each), with what came back, so a test
asserts on what happened rather than on what was planned. Every fault is a real one where this
machine can make it real: the vLLM engine process is killed with SIGKILL, the sandbox's template
processes too, the python tool runs the substituted code in its sandbox for real. Only a request
that never answers is simulated (the engine's call waits forever), as a lost request is.

Plan entries (``AXPO_E2E_FAULTS`` = JSON list):

- ``{"kind": "engine_hang", "request": n, "times": t}``: the n-th training generation request of the
  run (counted in the trainer process, validation excluded) and its next ``t - 1`` tries (the same
  request id) never answer;
- ``{"kind": "engine_kill", "after": n}``: once n training requests were answered, every vLLM
  engine process (``VLLM::EngineCore``) is killed;
- ``{"kind": "python_code", "call": n, "code": "..."}``: the n-th python tool call runs this code
  instead of the model's;
- ``{"kind": "python_template_kill"}``: once every ``python_code`` fault has answered, the
  sandbox's template processes are killed (a killed template loses every call in flight from it,
  so the substituted calls are left to finish first).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import wrapt

_LOCK = threading.Lock()
_COUNTS = {"requests": 0, "answered": 0, "python": 0, "code_faults_done": 0}
_HANGING: dict[str, int] = {}


def _plan() -> list[dict]:
    return json.loads(os.environ.get("AXPO_E2E_FAULTS", "[]") or "[]")


def _log(record: dict) -> None:
    path = os.environ.get("AXPO_E2E_FAULT_LOG")
    if not path:
        return
    with _LOCK, open(path, "a") as out:
        out.write(json.dumps({"t": time.time(), "pid": os.getpid(), **record}, default=str) + "\n")


def _faults(kind: str) -> list[dict]:
    return [f for f in _plan() if f.get("kind") == kind]


def kill_engine_processes() -> list[int]:
    """SIGKILL every vLLM engine-core process of this machine (one e2e run at a time)."""
    import psutil

    killed = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        title = " ".join(proc.info.get("cmdline") or []) or proc.info.get("name") or ""
        if title.startswith("VLLM::EngineCore"):
            try:
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
            except ProcessLookupError:
                pass
    return killed


@wrapt.when_imported("axpo_rllm.integrations.rllm.engine_adapters")
def _wrap_engine(module) -> None:
    hangs, kills = _faults("engine_hang"), _faults("engine_kill")
    if not (hangs or kills):
        return
    original = module.RllmTokenEngine.generate

    @functools.wraps(original)
    async def generate(self, request):
        if getattr(self.rllm_engine, "is_validation", False):
            return await original(self, request)
        with _LOCK:
            _COUNTS["requests"] += 1
            number = _COUNTS["requests"]
            for fault in hangs:
                if number == fault["request"]:
                    _HANGING[request.request_id] = int(fault.get("times", 1))
            hang = _HANGING.get(request.request_id, 0) > 0
            if hang:
                _HANGING[request.request_id] -= 1
        if hang:
            _log({"kind": "engine_hang", "request": number, "request_id": request.request_id})
            await asyncio.Event().wait()  # cancelled by the agent's request timeout
        result = await original(self, request)
        with _LOCK:
            _COUNTS["answered"] += 1
            answered = _COUNTS["answered"]
        for fault in kills:
            if answered == fault["after"]:
                _log({"kind": "engine_kill", "after": answered, "killed": kill_engine_processes()})
        return result

    module.RllmTokenEngine.generate = generate


def _kill_templates(tool) -> list[int]:
    pool = getattr(tool, "_pool", None)
    backend = getattr(pool, "_backend", None)
    killed = []
    for template in list(getattr(backend, "templates", []) or []):
        try:
            os.killpg(template.proc.pid, signal.SIGKILL)  # as a crash would: the pool is not told
            killed.append(template.proc.pid)
        except ProcessLookupError:
            pass
    return killed


@wrapt.when_imported("axpo_rllm.envs.env")
def _wrap_env(module) -> None:
    codes, kills = _faults("python_code"), _faults("python_template_kill")
    if not (codes or kills):
        return
    original = module.MultimodalToolEnv._execute

    @functools.wraps(original)
    async def _execute(self, name, arguments, context):
        if str(name) != "python":
            return await original(self, name, arguments, context)
        with _LOCK:
            _COUNTS["python"] += 1
            number = _COUNTS["python"]
        record = {"kind": "python_call", "call": number}
        substituted = False
        for fault in codes:
            if number == fault["call"]:
                arguments, record["code"], substituted = {"code": fault["code"]}, fault["code"], True
        result = self._checked_images(await original(self, name, arguments, context))
        if substituted:
            with _LOCK:
                _COUNTS["code_faults_done"] += 1
                kill = bool(kills) and _COUNTS["code_faults_done"] == len(codes)
            if kill:
                _log({"kind": "python_template_kill", "after_call": number,
                      "killed": _kill_templates(self.tools["python"])})
        record |= {"error": result.error[:300], "images": [list(im.size) for im in result.images],
                   "text": result.text[:200]}
        _log(record)
        return result

    module.MultimodalToolEnv._execute = _execute


class FaultySearch:
    """The search backend, down and then answering garbage before it recovers (runs in the test).

    A loopback HTTP server in front of the real one: the requests numbered in ``schedule`` get
    ``"down"`` (the connection is closed without an answer), ``"garbage"`` (HTTP 200, not JSON) or
    ``"wrong_shape"`` (HTTP 200, JSON without the hits); every other request is forwarded. What each
    request got is kept in :attr:`served`.
    """

    def __init__(self, upstream: str, schedule: dict[int, str]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.request import Request, urlopen

        outer = self
        self.upstream, self.schedule, self.served = upstream.rstrip("/"), dict(schedule), []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with _LOCK:
                    number = len(outer.served) + 1
                    fault = outer.schedule.get(number, "ok")
                    outer.served.append(fault)
                if fault == "down":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault in ("garbage", "wrong_shape"):
                    payload = b"<html>502 upstream gone</html>" if fault == "garbage" else b'{"status": "ok"}'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                request = Request(outer.upstream + self.path, data=body, headers={"Content-Type": "application/json"})
                with urlopen(request, timeout=30) as answer:
                    payload, status = answer.read(), answer.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "FaultySearch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

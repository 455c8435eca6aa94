"""An isolated, warm pool that runs model-written Python over the task's images.

Layers, strongest first; :func:`detect_isolation` picks at start-up the best that works here and
every result reports it (``SandboxResult.isolation``, ``ToolResult.metadata["isolation"]``):

``bwrap``    bubblewrap: new network namespace (a private loopback: no route out, not even to
             the host's 127.0.0.1), new PID/IPC/UTS namespaces, a mount namespace that shows only
             ``/usr`` and the Python trees (read-only), a private ``/dev`` and ``/proc``, and a
             size-capped tmpfs work dir; ``--die-with-parent``.
``unshare``  util-linux ``unshare`` as root: new network/PID/IPC/UTS/mount namespaces (fresh
             ``/proc``), but the host file system stays visible (the Python trees read-only).
``rlimits``  a plain child process: only the layers below.

The Python trees are the interpreter's installation (its standard library included), the venv,
where PIL/numpy live, and the interpreter's own files outside them (``libpython``), each shown at
its own path wherever it lives -- under ``/tmp`` (bwrap mounts its fresh ``/tmp`` first, then
binds them into it), under a ``0700`` home -- and nothing else of the directories above them: at
``bwrap`` those are empty directories, at ``unshare`` each directory closed to other users above a
tree is covered, in the worker's own mount namespace, by a tmpfs that leads only to the trees. No
permission on the host is changed, and a call's private uid reads exactly those files.

A floor: ``SandboxPool(min_isolation=..., private_uid=...)`` (and the python tool's config keys of
those names) refuses to start below it (:class:`IsolationBelowFloor`), naming for each stronger
choice what was missing -- bubblewrap, root, the path a private uid could not read -- and the fix.
The training configs ask for ``bwrap`` with a private uid; the default floor accepts any layer.

Two start methods, the same layers and guarantees (``SandboxPool(start=...)``):

``fork``     (default) ``size`` *template* processes (default 1), each started exactly as a spawned
             worker is (same layer command, empty environment, ``python -I``): it imports
             PIL/numpy once, makes itself non-dumpable and then never runs model code. Per call the
             trainer hands it the call's pipes and files (SCM_RIGHTS) and it forks the call's
             supervisor, which at ``bwrap`` and ``unshare`` is PID 1 of *fresh* mount/PID/network/
             IPC/UTS namespaces for this call alone, mounts a fresh ``/proc`` and a fresh
             size-capped tmpfs work dir (``workdir_mb``, also at ``unshare``) and forks the process
             that runs the code (``_worker.py`` describes the processes). Shared between calls: the
             template's mounts (at ``bwrap`` ``/usr``; the Python trees, read-only) and
             its imported memory image, copied on write and never executed upon by model code (the
             interpreter's string-hash seed included; ``random``'s and numpy's global generators
             are reseeded per call). Per call: the processes, uid, namespaces, ``/proc``, work dir,
             fds, rlimits and CPU budget; closing the call's lifeline pipe makes its supervisor kill
             the whole tree, and EOF on its status pipe says it is gone. A call costs ~10 ms of
             CPU (forks, namespaces, the code), so calls never wait on an interpreter start; a
             template that dies is restarted (calls in flight on it get a clear error, later calls
             go to the new one).
``spawn``    a fresh ``python -I`` per call, from ``size`` workers (default 2) started ahead: ~10-30
             ms when a ready worker waits, but each start costs ~0.1-0.5 s of CPU, so back-to-back
             calls queue behind starts. The fallback, and the baseline of ``benchmarks/bench_tools.py``.

Always, under every layer and start method: a fresh process per call that runs nothing but this
call (never the trainer: a template is started like a worker, not forked from the trainer), an
empty environment (no secrets inherited), ``PR_SET_NO_NEW_PRIVS``, rlimits (CPU seconds, address
space, file size, open files, processes, no core), exactly four fds (0: the job, 1 and 2: the
output files, the result pipe: 3 under ``fork``), a wall-clock timeout after which the whole
process tree is killed (PID namespace teardown; a uid-wide sweep at ``rlimits``),
stdout/stderr in trainer-owned files read back truncated, and returned images capped in count and
pixels and sent as raw RGB (the trainer never decodes or unpickles what the sandbox writes). When
the trainer is root, each call also drops to its own uid (61000 + slot, a slot handed out again
only after that call's processes are gone: other users' files, signals to other processes and the
per-uid process count then apply) -- under ``bwrap`` and ``unshare`` whenever the trees' own files
are readable by other users; under ``rlimits`` only if the directories above them can be entered
too (a Python under ``/root`` cannot: ``Isolation.own_uid`` says which). Inside, a Python audit
hook ("guard", PEP 578) refuses sockets, process creation, signals to other pids, ctypes, gc
introspection and file access outside the work dir -- defence in depth only: it stops Python
code, not native code.

What it does NOT stop: CPU and memory-bandwidth contention with the trainer (no cgroup CPU share;
a call may use one core up to its CPU-time limit); side channels; kernel exploits (no seccomp
filter); tmpfs pages (up to ``workdir_mb`` per call) count against host memory. At ``unshare``
and ``rlimits``: native code that gets past the guard (a C extension already imported, an
interpreter bug) sees the host file system with the worker's uid -- and that uid is **root** when
``own_uid`` is false, so such code could read or write any host file; at ``rlimits`` it could also
reach the network, signal other processes (the trainer and, under ``fork``, the template
included, if they share the uid) and fill the disk file by file within the timeout. Training asks
for ``bwrap`` (``apt-get install bubblewrap``) through its floor; ``AXPO_SANDBOX_ISOLATION`` pins
a layer (below a floor, the pool refuses to start and names the variable).

Two time limits, never racing: ``cpu_s`` of CPU time counted exactly from the start of the code
and ``timeout_s`` of wall-clock time from the job's hand-over. Which one fired is read from what the
worker did, not guessed from timing: the worker sends a ``b"cpu"`` frame the moment its CPU budget is
spent (then the code gets ``CPUTimeExceeded``), and a worker ended by ``SIGXCPU`` was ended by the
kernel's CPU backstop; anything still running at the wall deadline without having sent that frame is
killed by the wall clock. Once the CPU limit has fired the trainer waits up to ``CPU_REPORT_GRACE_S``
past either deadline for the report. ``SandboxResult.limit`` names the limit (``cpu_time`` /
``wall_clock``) and the error says it in a fixed sentence, so a spinning loop gets the same report
every run. A single-threaded loop cannot reach ``cpu_s`` before ``timeout_s`` when ``cpu_s >=
timeout_s`` (the wall clock then stops it); with ``cpu_s`` well below ``timeout_s`` the CPU limit
does, unless the machine is so loaded that the worker gets less than ``cpu_s / timeout_s`` of a core.

:meth:`SandboxPool.arun` never blocks the event loop and is not bounded by asyncio's default
thread pool: under ``fork`` it is asyncio-native (the call's pipes are watched by the loop), under
``spawn`` it runs on the pool's own threads. :meth:`SandboxPool.run` is the blocking form (any
thread). Measured rates: ``benchmarks/bench_tools.py``.

The package, one idea per module: :mod:`.layers` (the layers' commands and the Python trees a call
is shown), :mod:`.probe` (which layer works here), :mod:`.floor` (the weakest layer a pool
accepts), :mod:`.uids` (private uid slots), :mod:`.launch` (how a worker or template is started),
:mod:`.wire` (the job and the length-prefixed frames back), :mod:`.results` (limits, results,
errors), :mod:`.backend` (what a start method provides), :mod:`.fork` and :mod:`.spawn` (the two
start methods), :mod:`.pool` (:class:`SandboxPool`). ``_worker.py`` is the sandboxed side.
"""

from .backend import START_METHODS
from .floor import check_floor, meets_floor
from .layers import ISOLATION_LEVELS, Isolation
from .pool import SandboxPool
from .probe import _detect, detect_isolation, isolation_level  # noqa: F401 (_detect: the suite summary reads its cache)
from .results import IsolationBelowFloor, SandboxLimits, SandboxResult, SandboxUnavailable

__all__ = [
    "ISOLATION_LEVELS",
    "START_METHODS",
    "Isolation",
    "IsolationBelowFloor",
    "SandboxLimits",
    "SandboxResult",
    "SandboxPool",
    "SandboxUnavailable",
    "check_floor",
    "detect_isolation",
    "isolation_level",
    "meets_floor",
]

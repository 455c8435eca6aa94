"""The sandboxed worker: runs ONE piece of model-written Python per process, in two start modes.

This file is never imported by the trainer: its source is passed to ``python -I -u -c`` inside the
sandbox (so no project file needs to be visible there), with a JSON config as ``argv[1]`` whose
``mode`` picks how it serves. Standard library + PIL (+ numpy if installed) only. Results go out on
the result pipe ``result_fd`` (frames = 4-byte big-endian length + payload).

``mode="spawn"`` (one job per interpreter, the trainer starts one per call):

1. start (as root inside the namespaces when the trainer is root): drop to the worker's own uid,
   set rlimits, import PIL/numpy (the warm part), send frame ``b"ready"``;
2. read one pickled job from stdin (the trusted direction): ``{"code", "images", "cpu_seconds"}``;
3. arm the CPU budget, install the Python guard (an audit hook), run the code (``image_<i>.png``
   files are written when the code may read files: :class:`InputFiles`);
4. send a JSON header frame ``{"error", "limit", "images": [[w, h], ...], "notes"}`` then one
   frame of RGB bytes per image. stdout/stderr go to the files the trainer opened as fds 1 and 2.

``mode="template"`` (a zygote: one long-lived process per pool slot, :func:`template_main`):
imports PIL/numpy once, makes itself non-dumpable and then never runs model code. Per call the
trainer sends on the inherited control socket (``control_fd``) a small JSON request (``uid``,
``workdir``) and, as SCM_RIGHTS, six fds: job pipe (read end), result pipe (write end), stdout file,
stderr file, lifeline pipe (read end), status pipe (write end). The template forks a supervisor
``A`` per call and keeps no per-call state (its children are reaped by ``SIGCHLD = SIG_IGN``):

* ``A`` (:func:`supervise`, trusted) keeps only the call's fds and starts a session. At the
  ``bwrap`` and ``unshare`` layers the call gets fresh mount/PID/network/IPC/UTS namespaces: when
  the template is root in its namespaces, ``A`` is forked as PID 1 of a new PID namespace
  (``unshare(CLONE_NEWPID)`` before the fork, ``setns`` back after it), unshares the others itself
  and mounts the call's file systems (:func:`mount_call_filesystems`: a fresh ``/proc`` with bwrap's
  read-only parts, a fresh size-capped tmpfs on the work dir); otherwise (a trainer that is not
  root: a user namespace per call) it unshares all of them and forks a separate init ``B``
  (:func:`namespace_init`) that mounts, forks the code and reports. At ``rlimits`` ``A`` forks the
  code directly (its own process group). A namespace init never runs the code itself: the kernel
  drops default-action signals such as SIGXCPU sent to it.
* ``A`` then waits on a pidfd of its child and on the lifeline. It writes the code's exit status on
  the status pipe (a separate ``B`` does that itself) and, when the code ended or the lifeline
  closed (the trainer finished, hit the wall clock or died), kills what is left -- as PID 1 every
  process of the namespace (then reaps them), as ``B``'s parent ``B`` (the kernel empties its
  namespace), at ``rlimits`` the process group plus a sweep of the call's uid -- and exits. EOF on
  the status pipe therefore means: the call's processes are gone.
* ``C`` (:func:`run_call`, untrusted from its first model-code line): puts the job pipe on fd 0, the
  output files on 1 and 2, the result pipe on ``result_fd`` (3) and closes every other fd, then
  does exactly what a spawned worker does: own uid, ``PR_SET_NO_NEW_PRIVS``, rlimits, read the job,
  arm the CPU budget (a forked child's CPU time starts at 0), guard, run, send the frames. The
  global random generators are reseeded first (``random`` by CPython's fork hook, numpy here).

The CPU budget (:func:`arm_cpu_budget`) is exact and counted from the start of the code: a profiling
timer (``ITIMER_PROF``, the process's CPU time) whose handler first sends the frame ``b"cpu"`` -- so the
trainer knows the CPU limit fired even if the code then swallows the exception or dies -- and raises
:class:`CPUTimeExceeded` in the code. ``RLIMIT_CPU`` is the kernel's backstop for code the handler
cannot interrupt (a long C call) or that disarms it: up to one second later ``SIGXCPU`` with its
default action ends the worker (an exit signal only the CPU limit gives), one second after that
``SIGKILL`` (once the budget has fired, the soft limit moves to the hard one: a second to report). The code may change its working directory: inputs, the image scan and the guard all use
the work dir's absolute path, and the worker goes back there before collecting results.
"""

import faulthandler
import fcntl
import json
import os
import pickle
import resource
import select
import signal
import struct
import sys
import traceback
import warnings

CONFIG = json.loads(sys.argv[1])
RESULT_FD = CONFIG["result_fd"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def send_frame(payload):
    os.write(RESULT_FD, struct.pack(">I", len(payload)))
    view = memoryview(payload)
    while view:
        view = view[os.write(RESULT_FD, view):]


def drop_privileges(uid):
    """Become the worker's own uid (root trainer only): files, signals and RLIMIT_NPROC then apply."""
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    try:  # no set-uid binary may give privileges back
        import ctypes  # the worker's own imports are kept to what each step needs (start-up cost per call)

        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except Exception:
        pass


def expose_python(mounts):
    """At ``unshare``, as root in the worker's own mount namespace and before any drop to the call's
    uid: make the Python trees reachable by that uid and read-only (the trainer's plan,
    ``layers.unshare_mounts``). A directory closed to other users above a tree is covered by a tmpfs
    that holds only the way down to the trees, bound back from fds opened before it was covered.
    Nothing on the host changes: the namespace is this worker's (and its calls')."""
    global LIBC
    import ctypes
    import stat

    if not mounts:
        return
    LIBC = LIBC or ctypes.CDLL(None, use_errno=True)
    libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    for covered, paths in mounts["shadow"]:
        keep = [p for p in mounts["keep"] if p == covered or p.startswith(covered + "/")]
        held = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC), p not in keep) for p in list(paths) + keep]
        libc_call("mount", b"tmpfs", covered.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
        for path, fd, read_only in held:
            make_mount_point(covered, path, stat.S_ISDIR(os.fstat(fd).st_mode))
            libc_call("mount", f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None)
            os.close(fd)
            if read_only:
                remount_read_only(path)
        remount_read_only(covered)
    for path in mounts["read_only"]:
        libc_call("mount", path.encode(), path.encode(), None, MS_BIND | MS_REC, None)
        remount_read_only(path)
    try:
        os.chdir(os.getcwd())  # by path again: through the new mounts
    except OSError:
        pass


def make_mount_point(top, path, is_dir):
    """``path`` (a directory, or an empty file to bind a file on) and the directories down to it
    from ``top``, each 0755 whatever the umask: the call's uid must pass through them."""
    parts = os.path.relpath(path, top).split("/")
    current = top
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        last = i == len(parts) - 1
        if os.path.lexists(current):
            continue
        if last and not is_dir:
            os.close(os.open(current, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            os.chmod(current, 0o644)
        else:
            os.mkdir(current)
            os.chmod(current, 0o755)


def remount_read_only(path):
    libc_call("mount", None, path.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def set_limits():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (CONFIG["max_processes"], CONFIG["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (CONFIG["max_open_files"], CONFIG["max_open_files"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (CONFIG["file_size_bytes"], CONFIG["file_size_bytes"]))
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def warm_imports():
    global Image
    from PIL import Image  # noqa: F811  # imported after the limits are set: what the model's code may use

    # What tobytes/asarray/save/draw import lazily on first use (~20-50 ms): pay it before the call.
    from PIL import ImageDraw, ImageEnhance, ImageFile, ImageFilter, ImageOps, ImageStat  # noqa: F401

    Image.init()
    Image.new("RGB", (2, 2)).tobytes()
    Image.MAX_IMAGE_PIXELS = CONFIG["max_decode_pixels"]
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes are checked explicitly
    try:
        import numpy  # model code imports it; paying here keeps calls fast

        numpy.asarray(Image.new("RGB", (2, 2))).mean()
    except ImportError:
        pass


def set_memory_limit():
    resource.setrlimit(resource.RLIMIT_AS, (CONFIG["memory_bytes"], CONFIG["memory_bytes"]))


def read_job():
    data = sys.stdin.buffer.read()
    return pickle.loads(data)


class InputFiles:
    """``image_<i>.png`` in the work dir, written only when the code may look at files.

    PNG encoding is most of a warm call's cost (tens of ms for a large image), and most code only
    uses ``images``. So the files are written before the code runs when its text mentions them
    (``image_``, ``png``), otherwise on its first file-system access inside the work dir (an audit
    hook on open/listdir/scandir/glob). ``stamps`` (size, mtime by absolute path) lets edited
    inputs count as outputs. Paths are absolute: the code may have changed directory by then.
    """

    TRIGGERS = ("open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile", "os.rename")

    def __init__(self, images, workdir):
        self.images, self.workdir = images, os.path.realpath(workdir)
        self.stamps = {}
        self.done = False

    def write(self):
        if self.done:
            return
        self.done = True  # before saving: the saves' own open events must not re-enter
        for i, image in enumerate(self.images):
            path = os.path.join(self.workdir, f"image_{i}.png")
            image.save(path, compress_level=1)
            stat = os.stat(path)
            self.stamps[path] = (stat.st_size, stat.st_mtime_ns)

    def install(self, code):
        lowered = code.lower()
        if not self.images or "image_" in lowered or "png" in lowered:
            self.write()
            return
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.done or event not in self.TRIGGERS:
            return
        path = args[0] if args else None
        if path is None or isinstance(path, int):
            path = "."
        try:
            path = os.path.realpath(os.fsdecode(os.fspath(path)))  # relative to the current directory
        except (TypeError, ValueError, OSError):
            return
        if path == self.workdir or path.startswith(self.workdir + "/"):
            self.write()


def install_guard(workdir):
    """Python-level defence in depth (PEP 578 audit hook); the OS sandbox is the real boundary."""
    real = os.path.realpath
    workdir = real(workdir)
    read_roots = tuple(real(p) for p in CONFIG["read_roots"]) + (workdir, f"/proc/{os.getpid()}")
    write_roots = (workdir,)
    devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    blocked = frozenset(CONFIG["blocked_events"])
    my_pid = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, roots):
        try:
            path = real(os.fsdecode(os.fspath(path)))
        except (TypeError, ValueError):
            return False
        return path in devices or any(path == r or path.startswith(r + "/") for r in roots)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if not inside(path, write_roots if writing else read_roots):
                raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} {path!r} is not allowed outside the work dir")
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                       "shutil.rmtree", "os.listdir", "os.scandir"):
            path = args[0] if args else "."
            if isinstance(path, int):
                return
            roots = read_roots if event in ("os.listdir", "os.scandir") else write_roots
            if not inside("." if path is None else path, roots):
                raise PermissionError(f"sandbox: {event} on {path!r} is not allowed outside the work dir")
        elif event in ("os.rename", "os.link", "os.symlink"):
            if not (inside(args[0], write_roots) and inside(args[1], write_roots)):
                raise PermissionError(f"sandbox: {event} {args[0]!r} -> {args[1]!r} is not allowed outside the work dir")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if args[0] != my_pid:
                raise PermissionError(f"sandbox: sending signals to pid {args[0]!r} is not allowed")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] == "__code__":
            # The hook's own code is the one object worth swapping; gc and ctypes (to find it) are blocked.
            raise PermissionError("sandbox: replacing a function's __code__ is not allowed")

    sys.addaudithook(hook)


class Display:
    """``display(img)`` / ``img.show()``: collect the image (copies, so later edits do not leak in)."""

    def __init__(self):
        self.images = []
        self.extra = 0  # displayed beyond max_images: counted, never copied

    def __call__(self, *objects, **_):
        for obj in objects:
            if not isinstance(obj, Image.Image):
                print(obj)
            elif len(self.images) < CONFIG["max_images"]:
                self.images.append(obj.copy())
            else:
                self.extra += 1


SCAN_DEPTH, SCAN_ENTRIES = 4, 2000
"""How deep and how many directory entries :func:`saved_images` looks at (a bound on a hostile tree)."""


def saved_images(stamps, workdir, notes):
    """New or modified image files anywhere under the work dir (subfolders the code made included),
    oldest first. Regular files only: symlinks, to files or folders, are never followed."""
    found, pending, seen = [], [(workdir, 0)], 0
    while pending:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            notes.append(f"{os.path.relpath(folder, workdir)}: not scanned for images ({type(exc).__name__})")
            continue
        for entry in entries:
            seen += 1
            if seen > SCAN_ENTRIES:
                notes.append(f"more than {SCAN_ENTRIES} files in the work dir: the rest were not scanned for images")
                return [path for _, path in sorted(found)]
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 < SCAN_DEPTH:
                        pending.append((entry.path, depth + 1))
                    continue
                if not entry.name.lower().endswith(IMAGE_SUFFIXES) or not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stamps.get(entry.path) == (stat.st_size, stat.st_mtime_ns):
                continue
            found.append((stat.st_mtime_ns, entry.path))
    return [path for _, path in sorted(found)]


def to_rgb(image, notes):
    """RGB, shrunk to at most ``max_image_pixels`` (keeping the aspect ratio)."""
    cap = CONFIG["max_image_pixels"]
    image = image.convert("RGB")
    w, h = image.size
    if w * h > cap:
        scale = (cap / (w * h)) ** 0.5
        image = image.resize((max(1, int(w * scale)), max(1, int(h * scale))))
        notes.append(f"an image of {w}x{h} was shrunk to {image.width}x{image.height}")
    return image


def collect_images(display, stamps, workdir, notes):
    out = list(display.images)
    for path in saved_images(stamps, workdir, notes):
        name = os.path.relpath(path, workdir)
        try:
            with Image.open(path) as im:
                if im.width * im.height > CONFIG["max_decode_pixels"]:
                    notes.append(f"{name}: {im.width}x{im.height} is too large to return")
                    continue
                im.load()
                out.append(im)
        except Image.DecompressionBombError:
            notes.append(f"{name}: too large to return (decompression bomb check)")
        except Exception as exc:
            notes.append(f"{name}: not returned ({type(exc).__name__})")
    cap = CONFIG["max_images"]
    if len(out) + display.extra > cap:
        notes.append(f"{len(out) + display.extra} images were produced; only the first {cap} are returned")
        out = out[:cap]
    result = []
    for image in out:
        try:
            result.append(to_rgb(image, notes))
        except Exception as exc:
            notes.append(f"an image could not be converted ({type(exc).__name__})")
    return result


class CPUTimeExceeded(BaseException):
    """Raised in the code when its CPU budget is spent (a BaseException: ``except Exception`` in the
    code does not swallow it)."""


CPU_MARKER = b"cpu"
"""The frame that tells the trainer, the moment it happens, that the CPU limit fired."""
BUDGET = {"armed": False, "fired": False, "seconds": 0.0}


def on_cpu_budget(signum, frame):
    if not BUDGET["armed"]:  # a late signal after the code finished: nothing to stop
        return
    BUDGET["armed"], BUDGET["fired"] = False, True
    try:
        send_frame(CPU_MARKER)
        # At least a second more (to the hard limit, then SIGKILL) to report: the soft limit may be close.
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    except (OSError, ValueError):
        pass
    raise CPUTimeExceeded(f"the code used more than its {BUDGET['seconds']:g} s of CPU time")


def arm_cpu_budget(seconds):
    """Exactly ``seconds`` of CPU time from now, then :class:`CPUTimeExceeded` (see the module docstring).

    RLIMIT_CPU counts whole seconds of the process's total CPU time (start-up included), so it is
    only the backstop: its soft limit lies 0-1 s after the budget, always after it.
    """
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # ends the worker: the exit signal names the limit
    signal.signal(signal.SIGPROF, on_cpu_budget)
    BUDGET["seconds"], BUDGET["armed"] = seconds, True
    signal.setitimer(signal.ITIMER_PROF, seconds)


def disarm_cpu_budget():
    BUDGET["armed"] = False
    signal.setitimer(signal.ITIMER_PROF, 0)


def run(job):
    workdir = os.path.realpath(os.getcwd())
    images = [Image.frombytes(mode, tuple(size), raw) for mode, size, raw in job["images"]]
    files = InputFiles(images, workdir)
    files.install(job["code"])
    display = Display()
    Image.Image.show = lambda self, *a, **k: display(self)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__, "images": images,
                 "image": images[0] if images else None, "display": display, "Image": Image}
    if CONFIG["guard"]:
        install_guard(workdir)
    error = None
    try:
        code = compile(job["code"], "<code>", "exec")
        try:
            arm_cpu_budget(float(job["cpu_seconds"]))
            exec(code, namespace)
        finally:
            disarm_cpu_budget()  # a CPUTimeExceeded raised right here still lands in the handlers below
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = f"SystemExit: {exc.code!r}"
    except BaseException as exc:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        # Drop the worker's own frame: the model only needs its code's lines.
        text = "".join(lines[:1] + [ln for ln in lines[1:] if "<code>" in ln or not ln.startswith("  File")])
        sys.stderr.write(text)
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    files.done = True  # the scan below must not write the inputs
    notes = []
    try:
        os.chdir(workdir)  # the code may have moved away; the images it saved are collected from here
    except OSError:
        pass
    try:
        out = collect_images(display, files.stamps, workdir, notes)
    except Exception as exc:  # the code may have left the work dir in any state
        out = []
        notes.append(f"images could not be collected ({type(exc).__name__})")
    header = {"error": error, "limit": "cpu_time" if BUDGET["fired"] else "", "images": [list(im.size) for im in out], "notes": notes}
    send_frame(json.dumps(header).encode())
    for im in out:
        send_frame(im.tobytes())


# ----------------------------------------------------------------------------------------------
# Template mode: one warm process; per job it forks a supervisor, which forks the call

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
CALL_NAMESPACES = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 1 << 14, 1 << 18
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")
"""What bwrap makes read-only in the ``/proc`` it mounts; the call's own ``/proc`` does the same."""
CALL_FDS = 6
"""Per request: job pipe (read), result pipe (write), stdout, stderr, lifeline (read), status (write)."""
LIBC = None
SUPERVISOR_IS_INIT = False
"""Set by the template: each call's supervisor ``A`` is PID 1 of the call's PID namespace."""


def libc_call(name, *args):
    """A libc call through ctypes (imported by the template, before any model code); OSError on failure."""
    import ctypes

    if getattr(LIBC, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def prctl(option, value):
    import ctypes

    libc_call("prctl", ctypes.c_ulong(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def keep_fds(fds, base):
    """Move ``fds`` to ``base``, ``base + 1``, ... and close every other fd above 2 (and below
    ``base + len(fds)`` when ``base`` is 0: the new 0, 1, 2)."""
    n = len(fds)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, base + n) for fd in fds]  # above the target block
    for i, fd in enumerate(high):
        os.dup2(fd, base + i)
    if base > 3:
        os.closerange(3, base)
    os.closerange(max(base + n, 3), os.sysconf("SC_OPEN_MAX"))
    return list(range(base, base + n))


def report(status_fd, message):
    """One JSON line on the status pipe (atomic: far below PIPE_BUF)."""
    try:
        os.write(status_fd, (json.dumps(message) + "\n").encode())
    except OSError:
        pass


def exit_status(wait_status):
    if os.WIFSIGNALED(wait_status):
        return {"signal": os.WTERMSIG(wait_status)}
    return {"exit": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else -1}


def kill_uid(uid):
    """SIGKILL every process of ``uid`` (the call's private uid), repeating while new ones appear.
    (The trainer's ``uids.kill_uid`` does the same from outside; this source runs with no project file
    visible, so it cannot share that one.)"""
    for _ in range(20):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
            except OSError:
                continue
        if not found:
            return


def template_main():
    """Import the warm part, then serve: one forked supervisor per request; never run model code."""
    global LIBC, SUPERVISOR_IS_INIT
    import ctypes
    import gc
    import socket

    faulthandler.enable()
    LIBC = ctypes.CDLL(None, use_errno=True)
    expose_python(CONFIG.get("mounts"))  # calls' mount namespaces are copies of this one
    prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/mem for a process of the same uid
    warm_imports()
    control = socket.socket(fileno=CONFIG["control_fd"])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    # Root in our namespaces: each supervisor is born PID 1 of its call's PID namespace (one
    # process less per call); else (a user namespace per call is needed) a separate init.
    SUPERVISOR_IS_INIT = CONFIG["level"] != "rlimits" and os.geteuid() == 0 and CONFIG.get("supervisor_is_init", True)
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY) if SUPERVISOR_IS_INIT else -1
    gc.freeze()  # children do not touch (copy) the imported objects' pages on their first collection
    control.send(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, CALL_FDS)
        except InterruptedError:
            continue
        if not message:
            os._exit(0)  # the trainer closed the pool (or died)
        pid = fork_supervisor(own_pid_namespace) if len(fds) == CALL_FDS else -1
        if pid == 0:
            code = 70
            try:
                supervise(message, fds)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in fds:  # a failed fork: the call sees its pipes close without a status (a clear error)
            os.close(fd)


def fork_supervisor(own_pid_namespace):
    """Fork ``A`` (-1 on failure); with ``own_pid_namespace``, as PID 1 of a new PID namespace."""
    if own_pid_namespace < 0:
        try:
            return os.fork()
        except OSError:
            return -1
    try:
        libc_call("unshare", CLONE_NEWPID)  # our next child only
    except OSError:
        traceback.print_exc()
        os._exit(1)  # calls could not get their own PID namespace: the pool starts a new template
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid != 0:
        try:
            libc_call("setns", own_pid_namespace, CLONE_NEWPID)  # the child after it: a new one again
        except OSError:
            traceback.print_exc()
            os._exit(1)
    return pid


def supervise(message, fds):
    """``A``: start the call (its own namespaces at bwrap/unshare), report how it ended, kill all of
    it when it ends or the lifeline closes, exit (the trainer then sees EOF on the status pipe)."""
    import gc

    gc.disable()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # waitpid must see the child (and so must the code)
    job, result, out, err, lifeline, status = keep_fds(fds, 10)  # the control socket is closed here
    mode = "rlimits" if CONFIG["level"] == "rlimits" else "init" if SUPERVISOR_IS_INIT else "outside"
    try:
        request = json.loads(message)
        uid, workdir = request["uid"], request["workdir"]
        os.setsid()
        if mode == "init":  # we are PID 1 of the call's new PID namespace
            libc_call("unshare", CALL_NAMESPACES & ~CLONE_NEWPID)
            mount_call_filesystems(uid, workdir)
        elif mode == "outside":
            euid, egid = os.geteuid(), os.getegid()
            libc_call("unshare", CALL_NAMESPACES | (CLONE_NEWUSER if euid else 0))
            if euid:  # not root: a user namespace of our own makes the mounts possible
                prctl(PR_SET_DUMPABLE, 1)  # /proc/self is root's while we are not dumpable
                for name, text in (("setgroups", "deny"), ("uid_map", f"{euid} {euid} 1"), ("gid_map", f"{egid} {egid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                prctl(PR_SET_DUMPABLE, 0)  # before any untrusted process exists
        child = os.fork()
        if child == 0:
            try:
                if mode == "outside":
                    namespace_init(uid, workdir, job, out, err, result, lifeline, status)
                else:
                    run_call(uid, workdir, job, out, err, result)
            except BaseException:
                traceback.print_exc()  # the call's stderr once run_call has placed its fds
            finally:
                os._exit(70)
        if mode == "rlimits":
            try:
                os.setpgid(child, child)  # also done by the child: killpg works whoever runs first
            except OSError:
                pass
    except BaseException as exc:
        report(status, {"error": f"{type(exc).__name__}: {exc}"})
        return
    for fd in (job, out, err, result):
        os.close(fd)
    watch(child, mode, uid, lifeline, status)


def watch(child, mode, uid, lifeline, status):
    """Until the child ends or the lifeline closes (the trainer never writes to it: readable =
    closed), then kill what is left: at ``rlimits`` the call's process group and uid, as a separate
    init's parent that init (the kernel empties its namespace), as init everything (then reap it)."""
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    try:
        poller.register(os.pidfd_open(child), select.POLLIN)
        wait_ms = 1000
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): look every 20 ms
        wait_ms = 20
    ended, closed = None, False
    while ended is None and not closed:
        try:
            events = poller.poll(wait_ms)
        except InterruptedError:
            continue
        closed = any(fd == lifeline for fd, _ in events)
        while True:  # as init, orphans of the code are ours to reap too
            try:
                pid, wait_status = os.waitpid(-1 if mode == "init" else child, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                ended = wait_status
    if ended is not None and mode != "outside":
        report(status, exit_status(ended))  # a separate init reports itself
    if mode == "rlimits":
        try:
            os.killpg(child, signal.SIGKILL)
        except OSError:
            pass
        if uid is not None:
            kill_uid(uid)
    elif mode == "outside" and ended is None:
        os.kill(child, signal.SIGKILL)
    if mode == "init":
        while True:
            try:
                os.kill(-1, signal.SIGKILL)  # everything in the namespace but us
            except OSError:
                pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    elif ended is None:
        os.waitpid(child, 0)


def mount_call_filesystems(uid, workdir):
    """In the call's new namespaces: a fresh /proc (bwrap's read-only parts too), a fresh pty
    instance where bwrap made one, a fresh size-capped tmpfs on the work dir (which becomes the
    current directory) and, as bwrap does, the new network namespace's loopback up."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # SIOCSIFFLAGS lo: UP | LOOPBACK | RUNNING
        fcntl.ioctl(probe.fileno(), 0x8914, struct.pack("16sh22x", b"lo", 0x1 | 0x8 | 0x40))
    libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    if os.path.islink("/dev/ptmx") and os.path.isdir("/dev/pts"):  # bwrap's private /dev
        libc_call("mount", b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC, b"newinstance,ptmxmode=0666,mode=620")
    libc_call("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    for name in PROC_READ_ONLY:
        path = f"/proc/{name}".encode()
        if os.path.exists(path):
            libc_call("mount", path, path, None, MS_BIND | MS_REC, None)
            libc_call("mount", None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    options = f"size={CONFIG['workdir_bytes']},mode=0700" + (f",uid={uid},gid={uid}" if uid is not None else "")
    libc_call("mount", b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    os.chdir(workdir)


def namespace_init(uid, workdir, job, out, err, result, lifeline, status):
    """``B`` (when ``A`` cannot be it): PID 1 of the call's namespaces: fresh /proc and work dir, fork
    the call, report its end."""
    os.close(lifeline)
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        mount_call_filesystems(uid, workdir)
        child = os.fork()
    except BaseException as exc:
        report(status, {"error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    if child == 0:
        try:
            run_call(uid, workdir, job, out, err, result)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(70)
    for fd in (job, out, err, result):
        os.close(fd)
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            report(status, exit_status(wait_status))
            os._exit(0)  # the kernel ends whatever the code left running in the namespace


def drop_capabilities():
    """Empty the bounding, effective, permitted and inheritable sets (a call in its own user namespace)."""
    import ctypes

    for cap in range(64):
        if LIBC.prctl(ctypes.c_ulong(PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            break  # EINVAL: past the last capability
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    libc_call("capset", header, (ctypes.c_uint32 * 6)())


def run_call(uid, workdir, job, out, err, result):
    """``C``: exactly what a spawned worker does, on the fds a spawned worker has."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    keep_fds([job, out, err, result], 0)  # 0 job, 1 stdout, 2 stderr, 3 = RESULT_FD; nothing else
    if uid is None and CONFIG["level"] != "rlimits" and os.geteuid() != 0:
        drop_capabilities()
    drop_privileges(uid)
    set_limits()
    set_memory_limit()
    os.chdir(workdir)
    for key in ("HOME", "TMPDIR", "MPLCONFIGDIR"):
        os.environ[key] = workdir
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()  # the template's global RNG state must not repeat in every call
    run(read_job())
    os._exit(0)


def spawn_main():
    """One job, then exit (``mode="spawn"``)."""
    faulthandler.enable()  # a crash in C code leaves its Python stack in stderr
    expose_python(CONFIG.get("mounts"))
    drop_privileges(CONFIG.get("uid"))
    set_limits()
    warm_imports()
    set_memory_limit()
    send_frame(b"ready")
    job = read_job()
    run(job)
    os._exit(0)  # skip interpreter teardown: the trainer kills the process tree anyway


def main():
    if CONFIG.get("mode") == "template":
        template_main()
    else:
        spawn_main()


main()

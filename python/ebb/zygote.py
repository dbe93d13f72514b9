"""The fork server behind `ebb run --preload` (a "zygote").

ebb starts it as

    python3 [FLAGS] -c BOOT PYTHON_DIR --fd N --ebb-pid P --stop-signal S
            --preload M1,M2 -- (-m MODULE | -c CODE | SCRIPT) [ARGS...]

It imports the preloaded modules once, collects and freezes the heap
(gc.freeze: later collections skip those objects, so the workers' collectors
do not write to every shared page), tells ebb it is ready, then forks a
worker each time ebb asks. Each worker runs the command in-process as
`python3 -m MODULE ARGS` or `python3 SCRIPT ARGS` would.

The workers must be ebb's children, so that ebb waits for them, sees how
they exit and applies its whole policy to them. The zygote forks twice: the
first child forks the worker and exits at once, and the worker, orphaned, is
adopted by ebb (a child subreaper, PR_SET_CHILD_SUBREAPER).

Messages on the socket (SOCK_SEQPACKET, one JSON object each):
    zygote -> ebb   {"event": "ready", "modules": [...], "warnings": [...], ...}
                    {"event": "error", "module": M, "error": ..., "traceback": ...}
    ebb -> zygote   {"op": "fork", "id": 3, "env": {"EBB_WORKER_ID": "3"}}
    zygote -> ebb   {"event": "forked", "id": 3, "pid": 1234} or {"event": "error", ...}
The zygote exits when ebb closes the socket.
"""
import builtins
import ctypes
import gc
import importlib
import importlib.util
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
import types
import warnings
from importlib.machinery import SourceFileLoader

# Everything the workers need is imported here, in the fork server: what a
# worker imports after the fork is its own private copy.
_libc = ctypes.CDLL(None, use_errno=True)

# Everything the zygote itself creates is garbage for the workers: no
# collections while the app loads, so nothing moves and no holes open.
gc.disable()


def _fail(conn, msg):
    """Sends one message to ebb; False if it could not be sent."""
    if conn is not None:
        try:
            conn.send(json.dumps(msg).encode())
            return True
        except OSError:
            pass
    return False


def _parse(argv):
    """Our own arguments, then the worker command after '--'."""
    opts = {"preload": [], "fd": -1, "ebb_pid": 0, "stop_signal": int(signal.SIGTERM), "imports": ""}
    i = 0
    while i < len(argv) and argv[i] != "--":
        key, value = argv[i], argv[i + 1]
        if key == "--preload":
            opts["preload"] = [m for m in value.split(",") if m]
        elif key == "--fd":
            opts["fd"] = int(value)
        elif key == "--ebb-pid":
            opts["ebb_pid"] = int(value)
        elif key == "--stop-signal":
            opts["stop_signal"] = int(value)
        elif key == "--imports":
            opts["imports"] = os.path.abspath(value)  # the worker may change directory
        i += 2
    command = argv[i + 1:]
    if command[:1] == ["-m"]:
        opts["mode"], opts["target"], opts["args"] = "module", command[1], command[2:]
    elif command[:1] == ["-c"]:
        opts["mode"], opts["target"], opts["args"] = "code", command[1], command[2:]
    else:
        opts["mode"], opts["target"], opts["args"] = "script", command[0], command[1:]
    return opts


def _set_path_and_argv(opts):
    """sys.path[0] and sys.argv as `python3 -m/-c/SCRIPT` would set them, so
    that the preloaded modules resolve as the worker's imports will."""
    mode, target, args = opts["mode"], opts["target"], opts["args"]
    if mode == "script":
        sys.argv = [target] + args
        # A directory or zip with __main__.py is itself first on the path.
        first = os.path.realpath(target) if os.path.isdir(target) or _is_zip(target) else \
            os.path.dirname(os.path.realpath(target))
    elif mode == "module":
        sys.argv = ["-m"] + args  # runpy puts the module's path in argv[0]
        first = os.getcwd()
    else:
        sys.argv = ["-c"] + args
        first = ""
    # We were started with -c, which put '' first, unless -P or -I said not to.
    safe = getattr(sys.flags, "safe_path", False) or sys.flags.isolated
    if not safe and sys.path and sys.path[0] == "":
        sys.path[0] = first


def _is_zip(path):
    import zipfile
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _tasks():
    """Native threads of this process, but libebb's purger (it survives fork)."""
    out = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name != "ebb-purge" and int(tid) != os.getpid():
                out.add((int(tid), name))
    except OSError:
        pass
    return out


def _sockets():
    out = {}
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:"):
                out[int(fd)] = target
    except OSError:
        pass
    return out


_app_gc_enabled = True  # the app's own choice, made while it was imported


def _record_gc_choice():
    """While the app imports, gc.disable/gc.enable record what it asked for
    (the fork server keeps the collector off meanwhile, and the worker gets
    the app's choice). Returns the function that ends the recording; the
    wrappers then pass through, for modules that kept a reference to them."""
    real_enable, real_disable = gc.enable, gc.disable
    recording = [True]

    def enable():
        global _app_gc_enabled
        if not recording[0]:
            return real_enable()
        _app_gc_enabled = True

    def disable():
        global _app_gc_enabled
        if not recording[0]:
            return real_disable()
        _app_gc_enabled = False

    gc.enable, gc.disable = enable, disable

    def stop():
        recording[0] = False
        gc.enable, gc.disable = real_enable, real_disable

    return stop


def _preload(opts, conn):
    """Imports each module; returns (timings, warnings). On an import error
    tells ebb which module failed and why, and exits."""
    modules, warnings = [], []
    own = {opts["fd"]}
    for name in opts["preload"]:
        py_threads = set(threading.enumerate())
        tasks = _tasks()
        socks = _sockets()
        t0 = time.monotonic()
        try:
            importlib.import_module(name)
        except BaseException as e:  # SystemExit and KeyboardInterrupt at import are failures too
            tb = traceback.format_exc()
            sys.stderr.write(f"ebb zygote: cannot import {name}:\n{tb}")
            sys.stderr.flush()
            _fail(conn, {"event": "error", "module": name, "error": f"{type(e).__name__}: {e}", "traceback": tb})
            os._exit(1)
        modules.append({"name": name, "seconds": round(time.monotonic() - t0, 3)})
        new_py = [t for t in threading.enumerate() if t not in py_threads and t.is_alive()]
        new_tasks = _tasks() - tasks
        if new_py:
            names = ", ".join(t.name for t in new_py)
            warnings.append(f"{name} started {len(new_py)} Python thread(s) at import ({names}): "
                            "threads do not survive fork, the workers will not have them")
        elif new_tasks:
            names = ", ".join(sorted({n for _, n in new_tasks}))
            warnings.append(f"{name} started {len(new_tasks)} native thread(s) at import ({names}): "
                            "threads do not survive fork; fine only if the library restarts them in a child")
        new_socks = [fd for fd in _sockets() if fd not in socks and fd not in own]
        if new_socks:
            warnings.append(f"{name} opened {len(new_socks)} socket(s) at import (fd {', '.join(map(str, new_socks))}): "
                            "every worker would share the same connection; open connections after fork")
    return modules, warnings


def _command_text(opts):
    """The worker command as a user would type it: `python3 -m app.worker --queue high`."""
    python = os.path.basename(sys.executable) or "python3"
    mode, target, args = opts["mode"], opts["target"], opts["args"]
    head = {"module": [python, "-m", target], "code": [python, "-c", target], "script": [python, target]}[mode]
    return " ".join(head + list(args))


def _name_process(title, comm):
    """What `ps` and `top` show: the title (the command line, through Debian's
    python3-setproctitle when it is installed) and comm (15 bytes, by prctl)."""
    try:
        import setproctitle
        setproctitle.setproctitle(title)
    except ImportError:  # comm alone
        pass
    _libc.prctl(15, ctypes.c_char_p(comm.encode()[:15]))  # PR_SET_NAME


def _adopted_by(ebb_pid, deadline_s=5.0):
    """Waits until our parent (the short-lived middle process) is gone and
    ebb has adopted us."""
    end = time.monotonic() + deadline_s
    while os.getppid() != ebb_pid and time.monotonic() < end:
        time.sleep(0.001)
    return os.getppid() == ebb_pid


# ---- the import tree (ebb ps --fleet --imports, docs/imports.md) -------------

_recorder = None  # ebb/_imports_boot's _Recorder, when the imports are measured
_hook = None  # the module it comes from


def _measure_imports(opts):
    """Installs the import hook of `ebb imports` before the preload, under libebb only."""
    global _recorder, _hook
    if not opts["imports"]:
        return
    try:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_imports_boot", "sitecustomize.py")
        spec = importlib.util.spec_from_file_location("ebb._imports_hook", path)
        hook = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hook)
        from ebb import imports  # noqa: F401 - now, so that the tree does not show it
        recorder = hook._Recorder(None, tracemalloc=False)  # tracemalloc would slow every worker
        if recorder.counters is not None:
            recorder.install(usage=False)
            _recorder, _hook = recorder, hook
    except Exception as e:  # noqa: BLE001 - the tree is a report: never a reason not to serve
        sys.stderr.write(f"ebb zygote: the imports are not measured: {type(e).__name__}: {e}\n")


def _write_import_tree(opts):
    """<imports>.json and .txt (0600): the tree of what the fork server imported (libebb's counters)."""
    if not opts["imports"]:
        return None
    try:
        if _recorder is None:
            fd = os.open(opts["imports"] + ".json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"error": "libebb is not loaded, or ebb_counts() is missing"}))
            return None
        from ebb import imports
        data = _recorder.data()
        for r in data["records"]:  # the preloaded modules: not "imported at zygote.py"
            if r["parent"] is None and r.get("thread") is None and (r.get("at") or "").startswith(__file__):
                r["at"] = "ebb run --preload"
        report = imports.build(data)
        _hook._write_private(opts["imports"] + ".json", json.dumps(report))
        _hook._write_private(opts["imports"] + ".txt", imports.render(report, 64 << 10))
        return {"modules": report["modules_imported"], "live": report["live_imported"]}
    except Exception as e:  # noqa: BLE001 - the tree is a report: never a reason not to serve
        sys.stderr.write(f"ebb zygote: cannot write the import tree {opts['imports']}.json: {e}\n")
        return None


def _report_worker_imports(opts):
    """In a worker: one line per import that ends at the top, in <imports>.<pid>.jsonl (0600)."""
    if _recorder is None:
        return
    pid = os.getpid()
    path = f"{opts['imports']}.{pid}.jsonl"
    records = _recorder.records

    def on_top(index):
        if os.getpid() != pid:
            return  # a process the worker forked: not the worker's own imports
        r = records[index]
        line = {"name": r["name"], "live": r.get("live"), "modules": len(records) - index,
                "ms": round(r.get("ns", 0) / 1e6, 3), "at": r.get("at")}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass

    _recorder.on_top = on_top


def _become_worker(opts, conn, request):
    """In the worker: undo what the zygote set up, then return to run the command."""
    conn.close()
    os.setpgid(0, 0)  # its own process group, as ebb gives every worker
    ebb_pid = opts["ebb_pid"]
    if ebb_pid:
        if not _adopted_by(ebb_pid):
            os._exit(1)  # ebb died while we were being handed over: nobody would supervise us
        # If ebb dies without stopping us, stop gracefully rather than linger.
        # (Set only now: the death of the middle process would have sent it.)
        _libc.prctl(1, opts["stop_signal"])  # PR_SET_PDEATHSIG
        if os.getppid() != ebb_pid:
            os.kill(os.getpid(), opts["stop_signal"])
    # Signal handlers and the mask are left as they are: the fork server sets
    # none of its own (ebb starts it with an empty mask), so what is there is
    # what the interpreter and the preloaded modules set, as in a plain run.
    for key, value in request.get("env", {}).items():
        os.environ[key] = value
    worker_id = request.get("env", {}).get("EBB_WORKER_ID", "?")
    prefix = request.get("env", {}).get("EBB_PROFILE")
    if prefix:  # ebb run --profile: this worker's own capture, from here on
        lib = ctypes.CDLL(None)
        lib.ebb_profile_start.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
        rate = int(request["env"].get("EBB_PROFILE_RATE", "524288"))
        if request["env"].get("EBB_PROFILE_NATIVE") == "1":
            rate |= 1 << 63  # EBB_PROFILE_NATIVE in ebb.h: native stacks too
        err = lib.ebb_profile_start(prefix.encode(), rate)
        if err != 0:
            print(f"ebb worker {worker_id}: profile off: {os.strerror(err)}", file=sys.stderr, flush=True)
    _name_process(f"ebb worker {worker_id}: {_command_text(opts)}", f"ebb worker {worker_id}")
    _report_worker_imports(opts)
    # Python's random reseeds itself after fork; numpy's legacy global state does not.
    if "numpy.random" in sys.modules:
        try:
            sys.modules["numpy.random"].seed()
        except Exception:  # noqa: BLE001 - a reseed failure must not stop the worker
            pass
    # What the worker allocates is collected as usual (the frozen heap stays
    # out of it), unless the app itself turned the collector off at import.
    if _app_gc_enabled:
        gc.enable()


def _run_command(opts):
    """Runs the worker command in this process, as the interpreter would."""
    mode, target = opts["mode"], opts["target"]
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    if mode == "module":
        # What `python3 -m` itself calls (runpy._run_module_as_main), with the
        # warning that the module is already in sys.modules silenced: it was
        # preloaded on purpose.
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
                _, spec, code = runpy._get_module_details(target, runpy._Error)
        except runpy._Error as e:
            sys.exit(f"{sys.executable}: {e}")
        sys.argv[0] = spec.origin
        runpy._run_code(code, main.__dict__, None, "__main__", spec)
    elif mode == "code":
        main.__spec__ = None
        main.__loader__ = None
        exec(compile(target, "<string>", "exec"), main.__dict__)
    else:
        if not os.path.isfile(target) or _is_zip(target):  # a directory or zip with __main__.py
            runpy.run_path(target, run_name="__main__")
            return
        target = os.path.abspath(target)  # as CPython 3.9+ does for __file__ and tracebacks
        main.__file__ = target
        main.__cached__ = None
        main.__spec__ = None
        main.__loader__ = SourceFileLoader("__main__", target)
        with open(target, "rb") as f:  # compile() honours a coding declaration
            source = f.read()
        exec(compile(source, target, "exec"), main.__dict__)


def _check_command(opts):
    """Why the worker command cannot run, or None: found now, before any worker starts."""
    mode, target = opts["mode"], opts["target"]
    if mode == "script" and not os.path.exists(target):
        return f"can't open file {os.path.abspath(target)!r}: [Errno 2] No such file or directory"
    if mode == "module":
        try:
            if importlib.util.find_spec(target) is None:
                return f"No module named {target}"
        except Exception as e:  # noqa: BLE001 - a parent package that fails to import
            return f"cannot find module {target}: {type(e).__name__}: {e}"
    return None


def _serve(opts, conn):
    """The fork loop. Returns in the worker (to run the command); exits in the zygote."""
    while True:
        try:
            data = conn.recv(65536)
        except InterruptedError:
            continue
        if not data:
            os._exit(0)  # ebb closed the socket: the fleet is over
        request = json.loads(data)
        if request.get("op") != "fork":
            _fail(conn, {"event": "error", "error": f"unknown request {request!r}"})
            continue
        r, w = os.pipe()  # the middle process tells us the worker's pid
        go_r, go_w = os.pipe()  # we tell the worker that ebb knows its pid
        try:
            middle = os.fork()
        except OSError as e:  # EAGAIN under a pids limit, ENOMEM: ebb retries later
            for fd in (r, w, go_r, go_w):
                os.close(fd)
            _fail(conn, {"event": "error", "id": request.get("id"), "error": f"fork: {e}"})
            continue
        if middle == 0:
            try:
                os.close(r)
                os.close(go_w)  # only the fork server may say "go"
                worker = os.fork()
            except OSError:
                os._exit(1)  # nothing written: the fork server reports the failure
            if worker == 0:
                os.close(w)
                # Wait until the fork server has told ebb our pid. If it dies
                # first (ebb killed it), ebb would never know us: leave before
                # any of the app's code runs.
                if os.read(go_r, 1) != b"g":
                    os._exit(1)
                os.close(go_r)
                _become_worker(opts, conn, request)
                return
            try:
                os.setpgid(worker, worker)  # before ebb can signal the group
            except OSError:
                pass
            try:
                os.write(w, str(worker).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.close(go_r)
        pid_text = os.read(r, 32)
        os.close(r)
        os.waitpid(middle, 0)
        told = False
        if pid_text:
            told = _fail(conn, {"event": "forked", "id": request.get("id"), "pid": int(pid_text)})
        else:
            _fail(conn, {"event": "error", "id": request.get("id"), "error": "fork failed"})
        if told:
            os.write(go_w, b"g")
        os.close(go_w)


def main():
    opts = _parse(sys.argv[2:])  # argv[0] is "-c", argv[1] the directory of this package
    conn = socket.socket(fileno=opts["fd"])
    os.set_inheritable(opts["fd"], False)
    _set_path_and_argv(opts)
    _name_process(f"ebb fork server: {_command_text(opts)}", "ebb forkserver")
    t0 = time.monotonic()
    restore_gc = _record_gc_choice()
    _measure_imports(opts)
    modules, warnings = _preload(opts, conn)
    problem = _check_command(opts)  # may import parent packages: before the freeze
    restore_gc()
    tree = None if problem else _write_import_tree(opts)
    if problem:
        _fail(conn, {"event": "error", "command": True, "error": problem})
        os._exit(1)
    gc.collect()  # garbage from the imports would otherwise be frozen with the rest
    gc.freeze()
    ready = {
        "event": "ready",
        "pid": os.getpid(),
        "modules": modules,
        "seconds": round(time.monotonic() - t0, 3),
        "frozen": gc.get_freeze_count(),
        "warnings": warnings,
    }
    if tree is not None:
        ready["imports"] = tree
    _fail(conn, ready)
    _serve(opts, conn)
    _run_command(opts)

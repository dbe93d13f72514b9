"""The hook of `ebb imports`: measures every import this process makes.

`ebb imports` and `python3 -m ebb.imports` put this directory first on
PYTHONPATH, so that Python's site module imports this file at start-up in
place of the sitecustomize it hides, which it then imports itself. It does
nothing unless EBB_IMPORTS_OUT names the report's file, and it takes that
variable out of the environment: the command's own Python subprocesses are
not measured.

Every module goes through importlib's _load_unlocked(), which this file wraps:
around it, libebb's counters (ebb_counts(): live bytes and objects, bytes
allocated) or, without libebb, tracemalloc's traced bytes are read, and a
per-thread stack of the modules being loaded gives the tree. The hook's own
records are measured too and left out of every module's figures. Before the
hook is in place this file imports only what the interpreter has loaded
already, plus ctypes and atexit (listed in the report as ebb's own), so the
imports it measures are the program's. The report is written at exit, or
after EBB_IMPORTS_FOR seconds or EBB_IMPORTS_TASKS tasks, by ebb/imports.py
(docs/imports.md).

ebb/zygote.py loads this file too, for _Recorder: the fork server of
`ebb run --preload` measures what it preloads, and its workers what they
import after the fork. Nothing here may break the program it measures: the
bookkeeping swallows its own errors.
"""
import os
import sys

_SELF = sys._getframe().f_code.co_filename  # this file, as its functions' frames name it

def _chain():
    """Imports the sitecustomize this file hides (Debian has one)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    me = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        try:
            import sitecustomize  # noqa: F401 - the real one, if any
        except ImportError as e:
            if e.name != "sitecustomize":
                raise
    finally:
        sys.path[:] = saved
        if "sitecustomize" not in sys.modules and me is not None:
            sys.modules["sitecustomize"] = me


def _libebb_mapped():
    try:
        with open("/proc/self/maps") as maps:
            return any("libebb" in line for line in maps)
    except OSError:
        return False


def _text(value):
    """str(value), or its type's name when even that fails."""
    try:
        return str(value)
    except Exception:  # noqa: BLE001
        return f"<{type(value).__name__}>"


def _module_name(m):
    """The __name__ of a module object in sys.modules, read without running its code
    (importlib.util.LazyLoader modules load on any attribute access)."""
    try:
        if isinstance(m, type(sys)):
            name = object.__getattribute__(m, "__dict__").get("__name__")
            return name if isinstance(name, str) else None
    except Exception:  # noqa: BLE001
        pass
    return None


def _write_private(path, text):
    """Writes `path` through a temporary file, 0600, never through a symlink."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


class _Recorder:
    """The records of the imports, and the hook that makes them."""

    def __init__(self, out, tracemalloc=True):
        """out: the report's file, written at exit (None: the caller asks for
        data()). Without libebb, tracemalloc is started unless tracemalloc is
        False; then self.counters is None and nothing is measured."""
        self.at_start_modules = set(sys.modules)
        import _thread
        import ctypes  # also for the frames (install()): array.array would import collections
        import time
        self.frame_type = ctypes.c_int64 * 22
        self.out = out
        self.pid = os.getpid()
        self.ns = time.perf_counter_ns
        self.records = []  # dicts, in the order the imports started
        self.frames = []  # the bookkeeping of each record (install())
        self.hook_live = 0  # bytes the bookkeeping keeps (left out of every module's figures)
        self.stacks = {}  # thread id -> [Frame, ...] of the imports under way
        self.used = {}  # module name -> True: one of its functions ran outside its own import
        self.usage = False
        self.profiling = False
        self.written = False
        self.on_top = None  # called with a record's index when a top-level import ends
        self.lock = _thread.allocate_lock()  # records' indices, and write()
        self.ident = _thread.get_ident
        self.main_thread = _thread.get_ident()
        self.counters = "tracemalloc" if tracemalloc else None
        # Under pymalloc (PYTHONMALLOC not malloc) small objects live in
        # arenas libebb does not see one by one: tracemalloc then.
        if _libebb_mapped() and os.environ.get("PYTHONMALLOC", "") in ("malloc", "malloc_debug"):
            class Counts(ctypes.Structure):  # ebb_counts_t, include/ebb.h
                _fields_ = [(f, ctypes.c_uint64) for f in ("live_bytes", "live_objects", "allocs_total",
                                                           "requested_total")]

            try:
                # PyDLL: the call keeps the GIL, so no other thread runs (and
                # fills the same buffer) between two reads of one import.
                fn = ctypes.PyDLL(None).ebb_counts
            except AttributeError:
                fn = None
            if fn is not None:
                buf, size = Counts(), ctypes.sizeof(Counts)
                ref = ctypes.byref(buf)
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

                def read():
                    fn(ref, size)
                    return buf.live_bytes, buf.requested_total, buf.live_objects

                def read_into(frame, i):  # no tuple: CPython keeps freed tuples for reuse, unseen by malloc
                    fn(ref, size)
                    frame[i] = buf.live_bytes
                    frame[i + 1] = buf.requested_total
                    frame[i + 2] = buf.live_objects

                self.read, self.read_into = read, read_into
                self.counters = "libebb"
        if self.counters == "tracemalloc":
            import _tracemalloc
            if not _tracemalloc.is_tracing():
                _tracemalloc.start(1)
            traced = _tracemalloc.get_traced_memory
            self.read = lambda: (traced()[0], None, None)

            def read_into(frame, i):
                frame[i] = traced()[0]
                frame[i + 1] = frame[i + 2] = -1  # not known

            self.read_into = read_into
        if self.counters is None:
            return
        # The first compile() of source sets up the compiler's AST types, about
        # 210 KB kept for good: done here, so that it is not charged to the
        # first module that has no .pyc.
        compile("0", "<ebb imports>", "eval")
        self.at_start = self.read()[0]
        self.loaded_before = sorted(sys.modules)
        self.uncaught = None
        if out is None:
            return
        import atexit
        atexit.register(self.write)
        hook = sys.excepthook

        def excepthook(kind, value, tb):
            self.uncaught = f"{getattr(kind, '__name__', kind)}: {_text(value)}"
            hook(kind, value, tb)

        sys.excepthook = excepthook

    def where(self):
        """file:line of the import statement: the first frame outside importlib and this file."""
        f = sys._getframe(1)
        while f is not None:
            name = f.f_code.co_filename
            if not (name == _SELF or name.startswith("<frozen importlib") or
                    name.endswith(os.sep + "importlib" + os.sep + "__init__.py")):
                return f"{name}:{f.f_lineno}"
            f = f.f_back
        return None

    def install(self, usage):
        import _frozen_importlib as bootstrap
        original = bootstrap._load_unlocked
        records, stacks, read, ns, ident, where, lock = (self.records, self.stacks, self.read, self.ns, self.ident,
                                                         self.where, self.lock)

        frames, frame_type = self.frames, self.frame_type
        rounded = self.counters == "libebb"  # libebb counts an object at its size class (16-byte steps here)
        read_into = self.read_into

        # The bookkeeping of an import is a frame: a ctypes array of 22 machine
        # integers, kept, so that no number it holds is an object allocated in
        # one import's figures and freed in another's. What the bookkeeping
        # keeps (the record and the frame: E0..S and L1..E1) is measured and
        # left out of the importer's figures. A frame:
        #   0 record index; 1-4 children's live, allocated, objects, ns;
        #   5-7 the hook's own live, allocated, objects below this import;
        #   8-10 counters before the bookkeeping (E0); 11-13 at the start (S);
        #   14, 15 start and end ns; 16-18 at the end (L1); 19-21 after the bookkeeping (E1).
        # Allocated and objects are -1 under tracemalloc.

        def begin(spec):
            frame = frame_type()  # no list or tuple: freed ones go to CPython's free lists, unseen by malloc
            read_into(frame, 8)
            tid = ident()
            stack = stacks.get(tid)
            if stack is None:
                stack = stacks[tid] = []
            rec = {"name": spec.name, "parent": stack[-1][0] if stack else None, "at": None,
                   "thread": None if tid == self.main_thread else tid, "live": 0, "self_live": 0, "ns": 0,
                   "self_ns": 0, "kind": None, "allocated": None, "self_allocated": None, "objects": None,
                   "self_objects": None}
            with lock:
                frame[0] = len(records)
                records.append(rec)
                frames.append(frame)
            stack.append(frame)
            read_into(frame, 11)
            frame[14] = ns()
            return frame, stack

        def end(frame, stack, spec, error):
            frame[15] = ns()
            read_into(frame, 16)
            stack.pop()
            rec = records[frame[0]]
            rec["live"] = frame[16] - frame[11] - frame[5]
            rec["self_live"] = rec["live"] - frame[1]
            rec["ns"] = frame[15] - frame[14]
            rec["self_ns"] = rec["ns"] - frame[4]
            counted = frame[12] >= 0  # libebb: allocated bytes and objects too
            if counted:
                rec["allocated"] = frame[17] - frame[12] - frame[6]
                rec["self_allocated"] = rec["allocated"] - frame[2]
                rec["objects"] = frame[18] - frame[13] - frame[7]
                rec["self_objects"] = rec["objects"] - frame[3]
            if error is not None:
                rec["error"] = f"{type(error).__name__}: {_text(error)}"
            origin = spec.origin if isinstance(spec.origin, str) else ""
            rec["kind"] = ("builtin" if origin == "built-in" else "extension" if origin.endswith(".so") else
                           "frozen" if origin == "frozen" else "python")
            up = stack[-1] if stack else None
            if up is not None:
                up[1] += rec["live"]
                up[4] += rec["ns"]
                if counted:
                    up[2] += rec["allocated"]
                    up[3] += rec["objects"]
            if usage and spec.name == "threading" and "threading" in sys.modules:
                sys.modules["threading"].setprofile(self.profiler)
            if up is None and self.on_top is not None:
                self.on_top(frame[0])
            read_into(frame, 19)
            # Last: walking the stack makes frame objects of the importlib
            # frames, freed when they return; here that happens inside the
            # importer's own figures, both ways. The string is the hook's.
            e1_live = e1_objects = 0
            rec["at"] = at = where()
            if at is not None:
                n = sys.getsizeof(at)
                e1_live, e1_objects = (n + 15) & ~15 if rounded else n, 1
            hook_live = frame[5] + (frame[11] - frame[8]) + (frame[19] - frame[16]) + e1_live
            if up is None:
                self.hook_live += hook_live
                return
            up[5] += hook_live
            if counted:
                up[6] += frame[6] + (frame[12] - frame[9]) + (frame[20] - frame[17])
                up[7] += frame[7] + (frame[13] - frame[10]) + (frame[21] - frame[18]) + e1_objects

        def _load_unlocked(spec):
            try:
                frame, stack = begin(spec)
            except Exception:  # noqa: BLE001 - never break the import
                return original(spec)
            error = None
            try:
                return original(spec)
            except BaseException as e:
                error = e
                raise
            finally:
                try:
                    end(frame, stack, spec, error)
                except Exception:  # noqa: BLE001 - never break the import
                    pass

        self.original = original
        bootstrap._load_unlocked = _load_unlocked
        self.usage = usage
        if usage:
            self.profiling = True
            sys.setprofile(self.profiler)
            if "threading" in sys.modules:
                sys.modules["threading"].setprofile(self.profiler)

    def profiler(self, frame, event, arg):
        """sys.setprofile's hook: which modules' functions run."""
        if not self.profiling:
            return  # stopped from another thread, which cannot unset this one's hook
        if event == "call":
            if frame.f_code.co_name == "<module>":
                return
            name = frame.f_globals.get("__name__")
        elif event == "c_call":
            name = getattr(arg, "__module__", None)
        else:
            return
        if not isinstance(name, str) or name in self.used:
            return
        stack = self.stacks.get(self.ident())
        if stack and self.records[stack[-1][0]]["name"] == name:
            return  # the module's own import
        self.used[name] = True

    def stop(self):
        """Takes the hooks out."""
        import _frozen_importlib as bootstrap
        bootstrap._load_unlocked = self.original
        if self.usage:
            self.profiling = False
            sys.setprofile(None)
            if "threading" in sys.modules:
                sys.modules["threading"].setprofile(None)

    def data(self):
        """What ebb/imports.py's build() reads."""
        return {
            "pid": self.pid,
            "argv": list(sys.orig_argv),
            "counters": self.counters,
            "live_at_start": self.at_start,
            "live_now": self.read()[0],
            "hook_live": self.hook_live,
            "loaded_at_start": sorted(self.at_start_modules),
            "loaded_before": self.loaded_before,
            "records": list(self.records),
            "sys_modules": {name: _module_name(m) for name, m in list(sys.modules.items()) if isinstance(name, str)},
            "used": sorted(self.used) if self.usage else None,
            "uncaught": self.uncaught,
        }

    def write(self, stop_after=False):
        """Writes the report once, from the process that started the measurement.

        stop_after: written before the program's end (EBB_IMPORTS_FOR or
        _TASKS): `ebb imports` is told, by <out>.stop, to stop the program."""
        if os.getpid() != self.pid:
            return
        with self.lock:  # the --for thread and atexit: one writes, the other waits
            if self.written:
                return
            self.written = True
            try:
                self.stop()
                data = self.data()
                here = os.path.dirname(os.path.abspath(__file__))
                import importlib.util
                spec = importlib.util.spec_from_file_location("_ebb_imports_report",
                                                              os.path.join(os.path.dirname(here), "imports.py"))
                report = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(report)
                _write_private(self.out, report.text(data, _OPTIONS["format"], _OPTIONS["min"]))
                if stop_after:  # `ebb imports` waits for the exit, and SIGKILLs after 10 s
                    _write_private(self.out + ".stop", str(os.getpid()))
                    import signal
                    os.kill(os.getpid(), signal.SIGTERM)
            except Exception as e:  # noqa: BLE001 - say why, never break the program
                sys.stderr.write(f"ebb imports: could not write the report {self.out}: {type(e).__name__}: "
                                 f"{_text(e)}\n")


_recorder = None  # the measurement of this process, when EBB_IMPORTS_OUT asked for one
_tasks_left = None  # EBB_IMPORTS_TASKS: the report is written after this many more tasks
_OPTIONS = {"format": "text", "min": 65536}
_warned = []


def task_done():
    """ebb.celery and ebb.rq call this (through ebb.imports.task_done()) after each task."""
    global _tasks_left
    if _recorder is None or _tasks_left is None:
        return
    if os.getpid() != _recorder.pid:
        if not _warned:
            _warned.append(True)
            sys.stderr.write("ebb imports: --tasks counts the tasks of the measured process only; this one "
                             f"(pid {os.getpid()}) was forked from it (use a solo pool or rq's SimpleWorker)\n")
        return
    with _recorder.lock:
        _tasks_left -= 1
        last = _tasks_left == 0
    if last:
        _recorder.write(stop_after=True)


def _start():
    global _recorder, _tasks_left
    out = os.environ.pop("EBB_IMPORTS_OUT", None)
    if not out:
        return
    _OPTIONS["format"] = os.environ.pop("EBB_IMPORTS_FORMAT", "text")
    _OPTIONS["min"] = int(os.environ.pop("EBB_IMPORTS_MIN", "65536"))
    usage = os.environ.pop("EBB_IMPORTS_USAGE", "") == "1"
    after = os.environ.pop("EBB_IMPORTS_FOR", "")
    tasks = os.environ.pop("EBB_IMPORTS_TASKS", "")
    recorder = _Recorder(out)
    recorder.install(usage)
    _recorder = recorder
    if tasks:
        _tasks_left = int(tasks)
        sys.modules["ebb_imports_hook"] = sys.modules[__name__]  # where ebb.imports.task_done() finds it
    if after:
        import _thread
        import time

        def later():
            time.sleep(float(after))
            recorder.write(stop_after=True)

        _thread.start_new_thread(later, ())


if __name__ == "sitecustomize":  # not when the fork server loads this file for _Recorder
    try:
        _start()
    except Exception as e:  # noqa: BLE001 - the program runs anyway, unmeasured
        sys.stderr.write(f"ebb imports: cannot measure this program's imports: {type(e).__name__}: {_text(e)}\n")
    finally:
        _chain()

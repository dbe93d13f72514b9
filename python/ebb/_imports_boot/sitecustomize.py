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
per-thread stack of the modules being loaded gives the tree. Before the hook
is in place this file imports only what the interpreter has loaded already,
plus ctypes and atexit (listed in the report as ebb's own), so the imports it
measures are the program's. The report is written at exit, or after
EBB_IMPORTS_FOR seconds, by ebb/imports.py (docs/imports.md).
"""
import os
import sys


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


class _Recorder:
    """The records of the imports, and the hook that makes them."""

    def __init__(self, out):
        self.at_start_modules = set(sys.modules)
        import time
        self.out = out
        self.pid = os.getpid()
        self.ns = time.perf_counter_ns
        self.records = []  # dicts, in the order the imports started
        self.stacks = {}  # thread id -> [[record index, live, allocated, objects, ns of children], ...]
        self.used = {}  # module name -> True: one of its functions ran outside its own import
        self.written = False
        self.counters = "tracemalloc"
        if _libebb_mapped():
            import ctypes

            class Counts(ctypes.Structure):  # ebb_counts_t, include/ebb.h
                _fields_ = [(f, ctypes.c_uint64) for f in ("live_bytes", "live_objects", "allocs_total",
                                                           "requested_total")]

            try:
                fn = ctypes.CDLL(None).ebb_counts
            except AttributeError:
                fn = None
            if fn is not None:
                buf, size = Counts(), ctypes.sizeof(Counts)
                ref = ctypes.byref(buf)
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

                def read():
                    fn(ref, size)
                    return buf.live_bytes, buf.requested_total, buf.live_objects

                self.read = read
                self.counters = "libebb"
        if self.counters == "tracemalloc":
            import _tracemalloc
            if not _tracemalloc.is_tracing():
                _tracemalloc.start(1)
            traced = _tracemalloc.get_traced_memory
            self.read = lambda: (traced()[0], None, None)
        import _thread
        import atexit
        self.ident = _thread.get_ident
        self.main_thread = _thread.get_ident()
        # The first compile() of source sets up the compiler's AST types, about
        # 210 KB kept for good: done here, so that it is not charged to the
        # first module that has no .pyc.
        compile("0", "<ebb imports>", "eval")
        self.at_start = self.read()[0]
        self.loaded_before = sorted(sys.modules)
        atexit.register(self.write)
        self.uncaught = None
        hook = sys.excepthook

        def excepthook(kind, value, tb):
            self.uncaught = f"{kind.__name__}: {value}"
            hook(kind, value, tb)

        sys.excepthook = excepthook

    def where(self):
        """file:line of the import statement: the first frame outside importlib."""
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            if not (name.startswith("<frozen importlib") or name.endswith(os.sep + "importlib" + os.sep +
                                                                           "__init__.py")):
                return f"{name}:{f.f_lineno}"
            f = f.f_back
        return None

    def install(self, usage):
        import _frozen_importlib as bootstrap
        original = bootstrap._load_unlocked
        records, stacks, read, ns, ident, where = self.records, self.stacks, self.read, self.ns, self.ident, self.where

        def _load_unlocked(spec):
            tid = ident()
            stack = stacks.get(tid)
            if stack is None:
                stack = stacks[tid] = []
            rec = {"name": spec.name, "parent": stack[-1][0] if stack else None, "at": where(),
                   "thread": None if tid == self.main_thread else tid}
            frame = [len(records), 0, 0, 0, 0]
            records.append(rec)
            stack.append(frame)
            live0, alloc0, obj0 = read()
            t0 = ns()
            try:
                return original(spec)
            except BaseException as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                raise
            finally:
                t = ns() - t0
                live1, alloc1, obj1 = read()
                stack.pop()
                rec["live"] = live1 - live0
                rec["self_live"] = rec["live"] - frame[1]
                rec["ns"] = t
                rec["self_ns"] = t - frame[4]
                origin = spec.origin or ""
                rec["kind"] = ("builtin" if origin == "built-in" else "extension" if origin.endswith(".so") else
                               "frozen" if origin == "frozen" else "python")
                if alloc0 is not None:
                    rec["allocated"] = alloc1 - alloc0
                    rec["self_allocated"] = rec["allocated"] - frame[2]
                    rec["objects"] = obj1 - obj0
                    rec["self_objects"] = rec["objects"] - frame[3]
                if stack:
                    up = stack[-1]
                    up[1] += rec["live"]
                    up[4] += t
                    if alloc0 is not None:
                        up[2] += rec["allocated"]
                        up[3] += rec["objects"]
                if usage and spec.name == "threading" and "threading" in sys.modules:
                    sys.modules["threading"].setprofile(self.profiler)

        self.original = original
        bootstrap._load_unlocked = _load_unlocked
        if usage:
            self.usage = True
            sys.setprofile(self.profiler)
        else:
            self.usage = False

    def profiler(self, frame, event, arg):
        """sys.setprofile's hook: which modules' functions run."""
        if event == "call":
            if frame.f_code.co_name == "<module>":
                return
            name = frame.f_globals.get("__name__")
        elif event == "c_call":
            name = getattr(arg, "__module__", None)
        else:
            return
        if name is None or name in self.used:
            return
        stack = self.stacks.get(self.ident())
        if stack and self.records[stack[-1][0]]["name"] == name:
            return  # the module's own import
        self.used[name] = True

    def write(self):
        """Writes the report once, from the process that started the measurement."""
        if self.written or os.getpid() != self.pid:
            return
        self.written = True
        import _frozen_importlib as bootstrap
        bootstrap._load_unlocked = self.original
        if self.usage:
            sys.setprofile(None)
            if "threading" in sys.modules:
                sys.modules["threading"].setprofile(None)
        data = {
            "pid": self.pid,
            "argv": list(sys.orig_argv),
            "counters": self.counters,
            "live_at_start": self.at_start,
            "live_now": self.read()[0],
            "loaded_at_start": sorted(self.at_start_modules),
            "loaded_before": self.loaded_before,
            "records": list(self.records),
            "sys_modules": {name: getattr(m, "__name__", None) for name, m in list(sys.modules.items())},
            "used": sorted(self.used) if self.usage else None,
            "uncaught": self.uncaught,
        }
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            import importlib.util
            spec = importlib.util.spec_from_file_location("_ebb_imports_report",
                                                          os.path.join(os.path.dirname(here), "imports.py"))
            report = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(report)
            report.write(data, self.out, os.environ.get("EBB_IMPORTS_FORMAT", "text"),
                         int(os.environ.get("EBB_IMPORTS_MIN", "65536")))
        except Exception as e:  # noqa: BLE001 - say why, never break the program's exit
            sys.stderr.write(f"ebb imports: could not write the report {self.out}: {type(e).__name__}: {e}\n")


def _start():
    out = os.environ.pop("EBB_IMPORTS_OUT", None)
    if not out:
        return
    recorder = _Recorder(out)
    recorder.install(os.environ.pop("EBB_IMPORTS_USAGE", "") == "1")
    after = os.environ.pop("EBB_IMPORTS_FOR", "")
    if after:
        import _thread
        import time

        def later():
            time.sleep(float(after))
            recorder.write()

        _thread.start_new_thread(later, ())


_start()
_chain()

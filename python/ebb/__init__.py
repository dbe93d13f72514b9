"""ebb's Python side: libebb from Python, and glue for worker frameworks.

    import ebb
    ebb.loaded()          # True when libebb is this process's malloc
    ebb.stats()           # libebb's heap statistics, as a dict
    ebb.trim()            # give free memory back now; bytes released
    ebb.profile_start("/tmp/app")  # write an allocation capture /tmp/app.<pid>.ebbprof
    ebb.profile_stop()    # end it (docs/profile.md)
    ebb.isolate(f, *args) # run f in a forked child, return its result; its memory goes with it

Submodules, each used on its own:

- ebb.rq: RQ workers that stop between jobs when ebb recycles them, so no
  job is lost (`rq worker --worker-class ebb.rq.SimpleWorker`).
- ebb.celery: the same for Celery (`python3 -m ebb.celery -A proj worker`,
  or `ebb.celery.install(app)`), for the prefork pool's processes too, and `ebb.celery.freeze_before_fork()`,
  which keeps the app shared between the processes of Celery's prefork pool.
- ebb.gunicorn: config hooks that freeze a preloaded app so that workers
  keep sharing it (`from ebb.gunicorn import post_fork, when_ready`).
- ebb.gthread: gunicorn's gthread worker, stopped without resetting its
  keep-alive connections (`--worker-class ebb.gthread.ThreadWorker`).
- ebb.zygote: the fork server behind `ebb run --preload` (started by ebb).
"""
import ctypes
import os
import pickle
import select
import signal
import time
import traceback

__all__ = ["NotLoaded", "isolate", "loaded", "profile_start", "profile_stop", "stats", "trim"]

_STATS_FIELDS = ("allocs_total", "requested_total", "live_bytes", "thread_cached_bytes", "active_pages",
                 "resident_bytes", "mapped_bytes", "purged_total", "unmapped_total", "purge_calls",
                 "large_live_bytes", "large_cached_bytes", "segments", "page_size")


class NotLoaded(RuntimeError):
    """libebb is not this process's allocator."""


class _Stats(ctypes.Structure):  # ebb_stats_t, include/ebb.h
    _fields_ = [("version", ctypes.c_uint32), ("size", ctypes.c_uint32)] + [(f, ctypes.c_uint64)
                                                                            for f in _STATS_FIELDS]


def _lib():
    """libebb's functions in this process, or None (it is looked up, never loaded)."""
    try:
        process = ctypes.CDLL(None)
        process.ebb_stats.argtypes = [ctypes.POINTER(_Stats), ctypes.c_size_t]
        process.ebb_trim.restype = ctypes.c_size_t
        process.ebb_profile_start.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
        return process
    except (OSError, AttributeError):
        return None


def loaded():
    """True when libebb serves this process's malloc (LD_PRELOAD, or `ebb run`)."""
    return _lib() is not None


def _need():
    lib = _lib()
    if lib is None:
        raise NotLoaded("libebb is not loaded in this process: start it under `ebb run`, or with "
                        "LD_PRELOAD=/path/to/libebb.so PYTHONMALLOC=malloc")
    return lib


def stats():
    """libebb's heap statistics (include/ebb.h, ebb_stats_t) as a dict of ints.

    Raises NotLoaded when libebb is not this process's allocator."""
    s = _Stats()
    if _need().ebb_stats(ctypes.byref(s), ctypes.sizeof(s)) != 0:
        raise RuntimeError("ebb_stats() failed")
    return {f: getattr(s, f) for f in _STATS_FIELDS}


def trim():
    """Gives every free page back to the OS now; returns the bytes released.

    Without libebb, calls glibc's malloc_trim(0) instead and returns None
    (glibc does not say how much it released)."""
    lib = _lib()
    if lib is not None:
        return int(lib.ebb_trim())
    ctypes.CDLL("libc.so.6").malloc_trim(ctypes.c_size_t(0))
    return None


def profile_start(prefix, rate=524288, native=False):
    """Starts libebb's allocation profiler: the capture PREFIX.<pid>.ebbprof.

    One byte in `rate` bytes allocated is sampled on average (1: every
    allocation), with its native stack too if `native`; processes forked
    afterwards write their own capture. Read
    it with `ebb profile report`. Returns the capture's path. Raises
    NotLoaded without libebb, OSError when the capture cannot be made or one
    is being written already (EBUSY)."""
    prefix = os.path.abspath(os.fspath(prefix))
    err = _need().ebb_profile_start(prefix.encode(), int(rate) | (1 << 63 if native else 0))
    if err != 0:
        raise OSError(err, f"ebb.profile_start: {os.strerror(err)}", prefix)
    return f"{prefix}.{os.getpid()}.ebbprof"


def profile_stop():
    """Stops the profiler; the capture ends with what is live now. False when it was not on."""
    return _need().ebb_profile_stop() == 0


def isolate(func, *args, timeout=None, **kwargs):
    """Runs func(*args, **kwargs) in a forked child and returns its result.

    Whatever memory the call needs is the child's and goes back to the OS
    when it exits (seed 003: do memory-heavy work in a subprocess). The
    result must be picklable. An exception in func is raised here (its
    traceback text is attached as a note); a child that dies without an
    answer raises ChildProcessError; after `timeout` seconds the child is
    killed and TimeoutError is raised.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        code = 0
        try:
            try:
                payload = pickle.dumps((True, func(*args, **kwargs)))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                try:
                    payload = pickle.dumps((False, (e, traceback.format_exc())))
                except Exception:  # noqa: BLE001 - an exception that does not pickle
                    payload = pickle.dumps((False, (RuntimeError(repr(e)), traceback.format_exc())))
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([r], [], [], wait)[0]:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"ebb.isolate: {getattr(func, '__name__', func)} took more than {timeout} s")
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        raise ChildProcessError(f"ebb.isolate: the child running {getattr(func, '__name__', func)} died "
                                "without an answer")
    ok, value = pickle.loads(b"".join(chunks))
    if ok:
        return value
    exc, text = value
    if hasattr(exc, "add_note"):
        exc.add_note("in the child of ebb.isolate():\n" + text)
    raise exc

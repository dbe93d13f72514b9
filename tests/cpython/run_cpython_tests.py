#!/usr/bin/python3
"""Run CPython's own regression tests under libebb and under glibc malloc.

Both runs use Debian's /usr/bin/python3 with PYTHONMALLOC=malloc, so every
Python object allocation goes through malloc(); the ebb run adds
LD_PRELOAD=<libebb.so>. The two runs execute concurrently (each with
regrtest -jN). A module that fails (other than by hanging) is re-run once
under the same allocator and counts as failed only if it fails both times.
The script exits 1 only for modules that fail under ebb but pass under glibc.

Exit codes: 0 no ebb-only failures, 1 ebb-only failures (or libebb cannot be
preloaded), 2 library or CPython testsuite missing.

Usage: tests/cpython/run_cpython_tests.py [--lib PATH] [-j N] [--timeout SEC]
"""
import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PYTHON = "/usr/bin/python3"  # Debian's interpreter; the testsuite belongs to it
REPO = Path(__file__).resolve().parents[2]
DEFAULT_LIB = REPO / "build/lib/libebb.so"

# Slowest first, so that -j keeps every worker busy until the end.
MODULES = """
test_concurrent_futures test_asyncio test_signal test_io test_socket
test_subprocess test_threading test_zipfile test_queue test_weakref test_email
test_os test_mmap test_ctypes test_gc test_dict test_list test_set test_bytes
test_unicode test_json test_re test_pickle test_sqlite3 test_collections
test_itertools test_functools test_struct test_array test_deque test_heapq
test_bisect test_string test_textwrap test_csv test_zlib test_hashlib
test_decimal test_fractions test_math test_statistics test_datetime test_enum
test_dataclasses test_copy test_pprint test_types test_typing test_tempfile
test_shutil test_glob test_pathlib test_select test_thread
test_threading_local test_sched test_tuple test_long test_float test_bz2
test_lzma test_gzip test_tarfile test_base64 test_binascii test_codecs
test_operator test_sort test_random test_builtin test_memoryview
test_userdict test_userlist test_defaultdict test_ordered_dict test_contextlib
test_exceptions test_generators test_descr test_marshal test_unicodedata
test_difflib test_xml_etree test_xml_etree_c test_html test_ast test_tokenize
test_weakset test_iter test_dictviews test_sys
""".split()

# test_multiprocessing_fork takes many minutes in full; these classes (~170
# tests, ~30 s) cover fork()ed children, pipes, queues, pools, shared memory
# and managers. regrtest's --match is global, so it runs in its own regrtest.
MP_FORK = "test_multiprocessing_fork"
MP_FORK_MATCH = ["WithProcessesTest*", "TestSyncManagerTypes",
                 "WithManagerTestQueue", "WithManagerTestContainers"]

# The AF_VSOCK tests block forever in accept() on this VM, under glibc too.
IGNORE = ["*VSOCK*"]

OK_STATES = ("passed", "skipped", "ran no tests", "failed (env changed)")
PROGRESS = re.compile(r"\[\s*\d+/\d+(?:/\d+)?\] (test_\w+) (.*?)(?: -- running: .*)?$")
HEARTBEAT = re.compile(r"^\d+:\d\d:\d\d load avg: [\d.]+ running: ")
LIVE = set()  # running regrtest processes
INTERRUPTED = threading.Event()
TIMEOUT = re.compile(r"^Timeout \(\d+:\d\d:\d\d\)!$")

# Prints whether the library is mapped in this python, then in a child of it.
MAPS_CHECK = r"""
import subprocess, sys
with open("/proc/self/maps") as f:
    print(any(line.split()[-1] == sys.argv[1] for line in f), flush=True)
if sys.argv[2] == "spawn":
    subprocess.run([sys.executable, *sys.orig_argv[1:-1], "stop"], check=True)
"""


def env_for(lib):
    """Environment for the test interpreter: clean PYTHON* vars, malloc only."""
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
    env["PYTHONMALLOC"] = "malloc"
    if lib:
        env["LD_PRELOAD"] = lib
    return env


def die(code, msg):
    print(f"run_cpython_tests: {msg}", file=sys.stderr)
    sys.exit(code)


def testsuite_dir():
    out = subprocess.run([PYTHON, "-c", "import test, os; print(os.path.dirname(test.__file__))"],
                         capture_output=True, text=True, env=env_for(None))
    path = Path(out.stdout.strip()) if out.returncode == 0 else None
    if not path or not (path / "test_os.py").exists() or not (path / "regrtest.py").exists():
        die(2, f"CPython testsuite not found for {PYTHON} (install libpython3.11-testsuite)")
    return path


def check_preload(lib):
    """The library must be mapped in python and its children, and only with LD_PRELOAD."""
    def probe(env):
        out = subprocess.run([PYTHON, "-c", MAPS_CHECK, lib, "spawn"], env=env,
                             capture_output=True, text=True, timeout=60)
        return out.stdout.split(), out
    got, out = probe(env_for(lib))
    if got != ["True", "True"]:
        die(1, f"{lib} is not mapped in python under LD_PRELOAD "
               f"(exit {out.returncode}): {out.stdout.strip()} {out.stderr.strip()}")
    if probe(env_for(None))[0] != ["False", "False"]:
        die(1, "the /proc/self/maps check is broken: library found without LD_PRELOAD")
    print(f"preload check: {lib} is mapped in python and in its child processes")


def is_ok(state):
    return state.startswith(OK_STATES)


def regrtest(label, env, modules, jobs, timeout, log):
    """Run one regrtest; return {module: (state, output lines)}."""
    if INTERRUPTED.is_set():
        return {mod: ("interrupted", []) for mod in modules}
    args = ["-j", str(jobs), "--timeout", str(timeout)]
    if modules == [MP_FORK]:
        args += [a for pat in MP_FORK_MATCH for a in ("-m", pat)]
    else:
        args += [a for pat in IGNORE for a in ("-i", pat)]
    cmd = [PYTHON, "-m", "test", *args, *modules]
    # Hard limit in case regrtest itself hangs; its per-module --timeout fires first.
    limit = 3 * timeout
    results, current, start = {}, None, time.monotonic()
    with open(log, "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        LIVE.add(proc)
        killer = threading.Timer(limit, stop, (proc,))
        killer.start()
        for line in proc.stdout:
            logf.write(line)
            line = line.rstrip("\n")
            m = PROGRESS.search(line)
            if m:
                current = m.group(1)
                results[current] = (m.group(2), [])
                print(f"[{label:5}] {current} {m.group(2)}", flush=True)
            elif line.startswith("== Tests result"):  # regrtest's summary follows
                current = None
            elif current and not HEARTBEAT.match(line):
                results[current][1].append(line)
        proc.wait()
        killer.cancel()
        LIVE.discard(proc)
    missing = "missing from regrtest output"
    if time.monotonic() - start >= limit:
        missing = f"regrtest stopped after {limit} s"
    for mod in modules:
        results.setdefault(mod, (missing, []))
    for mod, (state, out) in results.items():
        if any(TIMEOUT.match(line) for line in out):  # faulthandler killed a hung worker
            results[mod] = (f"timed out (hung for {timeout} s)", out)
    return results


def stop(proc):
    """Interrupt regrtest (it then stops its workers), kill it if that is not enough."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def kill_leftovers():
    """Reap orphans of the test processes (we are their subreaper); kill live ones.

    Call only when no regrtest is running: every child of ours is then an orphan.
    """
    me, killed = str(os.getpid()), []
    while True:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                    children.append(int(stat.parent.name))
            except (OSError, IndexError):
                continue
        if not children:
            return killed
        for pid in children:  # killing one re-parents its own children to us
            try:
                if os.waitpid(pid, os.WNOHANG) == (0, 0):  # not already a plain zombie
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    killed.append(pid)
            except ChildProcessError:
                pass


def run_all(label, env, modules, jobs, timeout, log):
    """Regrtest the modules (the fork test separately); re-run failures once."""
    def once(mods):
        res = {}
        if MP_FORK in mods:
            res.update(regrtest(label, env, [MP_FORK], 1, timeout, log))
        main = [m for m in mods if m != MP_FORK]
        if main:
            res.update(regrtest(label, env, main, jobs, timeout, log))
        return res

    start = time.monotonic()
    res = once(modules)
    # Re-run failures once, except hangs: they would only hang again.
    failed = [m for m in modules if not is_ok(res[m][0]) and "timed out" not in res[m][0]]
    if failed and not INTERRUPTED.is_set():
        print(f"[{label:5}] re-running failed: {' '.join(failed)}", flush=True)
        for m, (state, out) in once(failed).items():
            if is_ok(state):
                state = f"passed on re-run (first: {res[m][0]})"
            res[m] = (state, out)
    return res, time.monotonic() - start


def fmt(sec):
    return f"{int(sec // 60)}m{sec % 60:04.1f}s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=os.environ.get("EBB_LIB", str(DEFAULT_LIB)),
                    help="allocator to preload (default: $EBB_LIB or %(default)s)")
    ap.add_argument("-j", "--jobs", type=int, default=2,
                    help="regrtest workers per allocator run (default: %(default)s)")
    ap.add_argument("--timeout", type=int, default=420,
                    help="per-module regrtest timeout in seconds (default: %(default)s)")
    ap.add_argument("--log-dir", help="where to write full regrtest logs (default: a new temp dir)")
    ap.add_argument("modules", nargs="*", help="run only these modules (default: built-in list)")
    args = ap.parse_args()

    if not Path(PYTHON).exists():
        die(2, f"{PYTHON} not found")
    lib = os.path.realpath(args.lib)
    if not Path(lib).is_file():
        die(2, f"library not found: {args.lib} (build it, or pass --lib / set EBB_LIB)")
    tdir = testsuite_dir()
    wanted = args.modules or MODULES + [MP_FORK]
    modules = [m for m in wanted if (tdir / f"{m}.py").exists() or (tdir / m).is_dir()]
    unavailable = [m for m in wanted if m not in modules]
    check_preload(lib)

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="ebb-cpython-tests-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = {"ebb": log_dir / "ebb.log", "glibc": log_dir / "glibc.log"}
    for f in logs.values():
        f.write_text("")
    print(f"running {len(modules)} modules under ebb ({lib}) and glibc, "
          f"PYTHONMALLOC=malloc, -j{args.jobs} each, logs in {log_dir}", flush=True)

    PR_SET_CHILD_SUBREAPER = 36  # orphans of the test processes become our children
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Handle SIGINT and SIGTERM alike. Setting a handler also means the tests never
    # inherit an ignored SIGINT (as in background jobs), which fails test_threading.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(run_all, name, env_for(lib if name == "ebb" else None),
                            modules, args.jobs, args.timeout, logs[name])
                for name in logs]
        try:
            while not all(f.done() for f in futs):
                time.sleep(0.5)  # not a blocking wait: signals are handled promptly
        except KeyboardInterrupt:
            INTERRUPTED.set()
            for proc in list(LIVE):
                stop(proc)
    if INTERRUPTED.is_set():
        kill_leftovers()
        die(130, "interrupted")
    (ebb, ebb_time), (glibc, glibc_time) = (f.result() for f in futs)
    total = time.monotonic() - start
    leaked = kill_leftovers()

    passed = [m for m in modules if is_ok(ebb[m][0])]
    both = [m for m in modules if not is_ok(ebb[m][0]) and not is_ok(glibc[m][0])]
    only_ebb = [m for m in modules if not is_ok(ebb[m][0]) and is_ok(glibc[m][0])]
    only_glibc = [m for m in modules if is_ok(ebb[m][0]) and not is_ok(glibc[m][0])]

    print("\n== CPython regression tests: libebb vs glibc (PYTHONMALLOC=malloc) ==")
    print(f"library: {lib}")
    print(f"modules run: {len(modules)}")
    if MP_FORK in modules:
        print(f"{MP_FORK} limited to: {' '.join(MP_FORK_MATCH)}")
    if unavailable:
        print(f"not in the installed testsuite, not run: {' '.join(unavailable)}")
    for name, res in (("ebb", ebb), ("glibc", glibc)):
        for m in modules:
            if res[m][0].startswith(("passed on re-run", "failed (env changed)")):
                print(f"note: {m} under {name}: {res[m][0]}")
    if leaked:
        print(f"note: killed {len(leaked)} leaked test processes: {' '.join(map(str, leaked))}")
    print(f"passed under ebb: {len(passed)}")
    print(f"failed under both (ignored): {' '.join(both) or '-'}")
    print(f"failed only under glibc (ignored): {' '.join(only_glibc) or '-'}")
    print(f"failed only under ebb: {' '.join(only_ebb) or '-'}")
    for m in only_ebb:
        print(f"\n--- {m} under ebb: {ebb[m][0]} (full output in {logs['ebb']}) ---")
        print("\n".join(ebb[m][1][:40]))
    print(f"\ntime: ebb {fmt(ebb_time)}, glibc {fmt(glibc_time)}, wall {fmt(total)}")
    print(f"{len(passed)} passed, {len(only_ebb)} failed")
    return 1 if only_ebb else 0


if __name__ == "__main__":
    sys.exit(main())

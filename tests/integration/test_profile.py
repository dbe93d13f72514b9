"""ebb profile: captures of real Python programs, and what the report says about them."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_run import fleet  # noqa: F401

PY = "/usr/bin/python3"
MB = 1_000_000

# Known amounts at known lines. bytes(n) asks malloc for n + 33 bytes
# (the object's header), the only allocation of its line.
ATTRIB = '''
def build_cache():
    cache = [None] * 600
    for i in range(600):
        cache[i] = bytes(100_000)                        # CACHE: 600 x 100,033 B kept
    return cache

def build_temp():
    temp = [None] * 1000
    for i in range(1000):
        temp[i] = bytes(100_000)                         # TEMP: freed before the end
    return temp

def parse():
    out = [None] * 6000
    for i in range(6000):
        out[i] = bytes(1000)                             # PARSE: 6000 x 1,033 B kept
    return out

def churn():
    for _ in range(2000):
        b = bytes(100_000)                               # CHURN: allocated and freed
        del b

cache = build_cache()
parsed = parse()
temp = build_temp()
del temp
churn()
'''
CACHE, TEMP, PARSE, CHURN = 600 * 100_033, 1000 * 100_033, 6000 * 1_033, 2000 * 100_033


def profile(ebb_bin, tmp_path, script, *options, timeout=120):
    path = tmp_path / "prog.py"
    path.write_text(script)
    prefix = tmp_path / "cap"
    r = subprocess.run([ebb_bin, "profile", "-o", str(prefix), *options, "--", PY, str(path)],
                       capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    captures = sorted(tmp_path.glob("cap.*.ebbprof"))
    return r, captures


def report(ebb_bin, capture, at="peak", top=100_000):
    r = subprocess.run([ebb_bin, "profile", "report", str(capture), "--format", "json", "--at", at,
                        "--top", str(top)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def site(rep, function, field="own_bytes", line=None):
    """Bytes of the sites of `function` (all its lines, or `line`), own or inclusive."""
    return sum(s[field] for s in rep["sites"] if s["function"] == function and line in (None, s["line"]))


def at_line(rep, marker, script=None):
    """Own bytes of the line of ATTRIB marked `# MARKER:`."""
    script = script or ATTRIB
    line = line_of(script, f"# {marker}:")
    return sum(s["own_bytes"] for s in rep["sites"] if s["line"] == line and s["file"].endswith("prog.py"))


def line_of(script, needle):
    return next(i for i, text in enumerate(script.splitlines(), 1) if needle in text)


def test_every_allocation_mode_attributes_exactly(ebb_bin, tmp_path):
    r, caps = profile(ebb_bin, tmp_path, ATTRIB, "--all")
    assert r.returncode == 0, r.stderr
    assert len(caps) == 1 and str(caps[0]) in r.stderr
    peak, end, total = (report(ebb_bin, caps[0], at) for at in ("peak", "end", "total"))
    assert peak["mode"] == "all" and peak["complete"]
    for rep in (peak, end):
        assert at_line(rep, "CACHE") == CACHE
        assert at_line(rep, "PARSE") == PARSE
        assert at_line(rep, "CHURN") == 0
    assert at_line(peak, "TEMP") == TEMP
    assert at_line(end, "TEMP") == 0
    assert at_line(total, "CHURN") == CHURN
    assert at_line(total, "TEMP") == TEMP
    assert at_line(total, "CACHE") == CACHE
    # Inclusive: the module's line that calls build_cache() holds what build_cache() allocated.
    call = line_of(ATTRIB, "cache = build_cache()")
    assert site(peak, "<module>", "inclusive_bytes", call) >= CACHE
    assert CACHE + TEMP + PARSE <= peak["peak"]["bytes"] < CACHE + TEMP + PARSE + 5 * MB
    assert CACHE + PARSE <= end["end"]["bytes"] < CACHE + PARSE + 5 * MB
    assert total["total_bytes"] >= CACHE + TEMP + PARSE + CHURN


NATIVE_C = r"""
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) void* inner_alloc(size_t n) { void* p = malloc(n); memset(p, 1, n); return p; }
__attribute__((noinline)) void* hold(size_t n) {
  void* p = inner_alloc(n);
  __asm__ volatile("" ::: "memory");  /* a call, not a tail jump: hold stays on the stack */
  return p;
}
"""
NATIVE_PY = """
import ctypes
lib = ctypes.CDLL(LIB)
lib.hold.restype = ctypes.c_void_p
lib.hold.argtypes = [ctypes.c_size_t]

def from_c():
    out = []
    for _ in range(20):
        out.append(lib.hold(1_000_000))                  # NATIVE: 20 x 1,000,000 B kept, by C
    return out

def build_cache():
    cache = [None] * 600
    for i in range(600):
        cache[i] = bytes(100_000)                        # CACHE: 600 x 100,033 B kept
    return cache

kept = from_c()
cache = build_cache()
"""


def test_native_stacks_put_python_frames_in_the_interpreters_place(ebb_bin, tmp_path):
    lib = tmp_path / "libnative.so"
    (tmp_path / "native.c").write_text(NATIVE_C)
    subprocess.run(["cc", "-O1", "-g", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "native.c")], check=True)
    script = NATIVE_PY.replace("LIB", repr(str(lib)))
    r, caps = profile(ebb_bin, tmp_path, script, "--all", "--native")
    assert r.returncode == 0, r.stderr
    rep = report(ebb_bin, caps[0])
    # The C functions, named from the library's symbols, hold exactly what they allocated.
    inner = [s for s in rep["sites"] if s["function"] == "inner_alloc"]
    assert inner and all(s["native"] and s["file"] == str(lib) for s in inner)
    assert site(rep, "inner_alloc") == 20 * MB
    assert site(rep, "hold") == 0 and site(rep, "hold", "inclusive_bytes") == 20 * MB
    # The Python frame that called into C sits above them, at its line...
    call = line_of(script, "# NATIVE:")
    assert site(rep, "from_c", "inclusive_bytes", call) >= 20 * MB
    # ...and pure Python allocations keep their lines.
    cache_line = line_of(script, "# CACHE:")
    assert CACHE <= site(rep, "build_cache", "inclusive_bytes", cache_line) < CACHE + MB
    # The interpreter's own frames are there, outside the Python ones; its
    # evaluation loop is replaced by them, and libebb's frames are left out.
    assert site(rep, "Py_BytesMain", "inclusive_bytes") >= 20 * MB + CACHE
    names = {s["function"] for s in rep["sites"]}
    assert not names & {"_PyEval_EvalFrameDefault", "malloc", "calloc", "ebb_malloc"}, names & {
        "_PyEval_EvalFrameDefault", "malloc", "calloc"}
    assert not any("profile_alloc" in n for n in names)
    table = subprocess.run([ebb_bin, "profile", "report", str(caps[0]), "--top", "5"], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and f"inner_alloc  {lib}\n" in table.stdout, table.stdout


def test_sampled_mode_is_within_ten_percent(ebb_bin, tmp_path):
    # 4 KiB: parse()'s 6 MB is then ~1,400 samples (2.5% standard error).
    r, caps = profile(ebb_bin, tmp_path, ATTRIB, "--rate", "4K")
    assert r.returncode == 0, r.stderr
    peak, end, total = (report(ebb_bin, caps[0], at) for at in ("peak", "end", "total"))
    assert peak["mode"] == "sampled" and peak["rate"] == 4096
    for rep, marker, want in [(peak, "CACHE", CACHE), (peak, "TEMP", TEMP), (peak, "PARSE", PARSE),
                              (end, "CACHE", CACHE), (end, "PARSE", PARSE),
                              (total, "CHURN", CHURN), (total, "TEMP", TEMP), (total, "CACHE", CACHE)]:
        got = at_line(rep, marker)
        assert abs(got - want) <= 0.10 * want, (rep["view"]["at"], marker, got, want)
    assert at_line(end, "TEMP") < 0.02 * TEMP
    assert abs(peak["peak"]["bytes"] - (CACHE + TEMP + PARSE)) < 0.10 * (CACHE + TEMP + PARSE)


def test_default_rate_catches_big_allocations(ebb_bin, tmp_path):
    r, caps = profile(ebb_bin, tmp_path, ATTRIB)
    assert r.returncode == 0, r.stderr
    peak = report(ebb_bin, caps[0])
    assert peak["rate"] == 512 * 1024
    # 100 KB objects at 512 KiB: 18% of them sampled, so 60 MB is ~110 samples (10% error).
    got = at_line(peak, "CACHE")
    assert 0.7 * CACHE < got < 1.3 * CACHE


FORKS = '''
import os
def fill(n):
    out = [None] * n
    for i in range(n):
        out[i] = bytes(100_000)
    return out
def parent_work():
    return fill(100)
def child_work():
    return fill(300)
kept = parent_work()
pid = os.fork()
if pid == 0:
    more = child_work()
    os._exit(0)
os.waitpid(pid, 0)
'''


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_a_forked_child_writes_its_own_capture(ebb_bin, tmp_path, native):
    r, caps = profile(ebb_bin, tmp_path, FORKS, "--all", *(["--native"] if native else []))
    assert r.returncode == 0, r.stderr
    assert len(caps) == 2, (caps, r.stderr)
    reps = [report(ebb_bin, c, "total") for c in caps]
    parent = next(x for x in reps if x["pid"] != reps[0]["ppid"] or x is reps[1])
    by_pid = {x["pid"]: x for x in reps}
    child = next(x for x in reps if x["ppid"] in by_pid)
    parent = by_pid[child["ppid"]]
    fill = line_of(FORKS, "out[i] = bytes")
    assert 300 * 100_033 < site(child, "child_work", "inclusive_bytes") < 300 * 100_033 + 64_000
    own = "inclusive_bytes" if native else "own_bytes"  # native: the C functions below the line own it
    assert site(child, "fill", own, fill) == 300 * 100_033
    assert site(parent, "child_work", "inclusive_bytes") == 0
    assert site(parent, "fill", own, fill) == 100 * 100_033
    # What the child inherited is the parent's: not in the child's capture.
    assert site(child, "parent_work", "inclusive_bytes") == 0
    if native:
        # The child ends (os._exit) before its purger ever looks at the loader's
        # list: the objects its parent named are named in its capture at fork.
        assert site(child, "Py_BytesMain", "inclusive_bytes") >= 300 * 100_033
        names = {x["function"] for x in child["sites"]}
        assert not any(n.startswith("?+") or n in ("malloc", "_PyEval_EvalFrameDefault") for n in names), names


HOLD = '''
import sys, time
def hold():
    out = [None] * 400
    for i in range(400):
        out[i] = bytes(100_000)
    return out
kept = hold()
print("ready", flush=True)
time.sleep(60)
'''


def test_a_sigkilled_process_leaves_a_capture_that_reads(ebb_bin, tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(HOLD)
    p = subprocess.Popen([ebb_bin, "profile", "-o", str(tmp_path / "cap"), "--all", "--", PY, str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert p.stdout.readline().strip() == "ready"
        caps = sorted(tmp_path.glob("cap.*.ebbprof"))
        assert len(caps) == 1
        pid = int(caps[0].name.split(".")[1])
        os.kill(pid, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGKILL, err
    rep = report(ebb_bin, caps[0], "end")
    assert site(rep, "hold", "own_bytes", line_of(HOLD, "out[i] = bytes")) == 400 * 100_033
    table = subprocess.run([ebb_bin, "profile", "report", str(caps[0])], capture_output=True, text=True)
    assert table.returncode == 0 and "hold" in table.stdout


THREADS = '''
import threading
barrier = threading.Barrier(4)
kept = [[None] * 200 for _ in range(4)]
def fill(k):
    barrier.wait()
    for i in range(200):
        kept[k][i] = bytes(50_000)
def worker_0(): fill(0)
def worker_1(): fill(1)
def worker_2(): fill(2)
def worker_3(): fill(3)
ts = [threading.Thread(target=f) for f in (worker_0, worker_1, worker_2, worker_3)]
for t in ts: t.start()
for t in ts: t.join()
'''


def test_threads_allocating_at_once_are_each_attributed(ebb_bin, tmp_path):
    r, caps = profile(ebb_bin, tmp_path, THREADS, "--all")
    assert r.returncode == 0, r.stderr
    rep = report(ebb_bin, caps[0], "end")
    for i in range(4):
        assert site(rep, f"worker_{i}", "inclusive_bytes") == 200 * 50_033
    assert site(rep, "fill", "own_bytes", line_of(THREADS, "= bytes(50_000)")) == 4 * 200 * 50_033


def test_the_offsets_libebb_reads_python_frames_with_match_the_headers(tmp_path):
    """libebb reads CPython 3.11's frames at fixed offsets: they must be this Python's."""
    source = (REPO / "src/alloc/profile.cc").read_text()
    ours = dict(re.findall(r"constexpr size_t (k\w+) = (\d+);", source.split("namespace py311 {")[1].split("}")[0]))
    fields = {"kTstateCframe": "offsetof(PyThreadState, cframe)",
              "kCframeCurrent": "offsetof(_PyCFrame, current_frame)",
              "kFrameCode": "offsetof(_PyInterpreterFrame, f_code)",
              "kFramePrevious": "offsetof(_PyInterpreterFrame, previous)",
              "kFramePrevInstr": "offsetof(_PyInterpreterFrame, prev_instr)",
              "kFrameIsEntry": "offsetof(_PyInterpreterFrame, is_entry)",
              "kFrameOwner": "offsetof(_PyInterpreterFrame, owner)",
              "kObType": "offsetof(PyObject, ob_type)",
              "kCodeFirstLine": "offsetof(PyCodeObject, co_firstlineno)",
              "kCodeFilename": "offsetof(PyCodeObject, co_filename)",
              "kCodeName": "offsetof(PyCodeObject, co_name)",
              "kCodeQualname": "offsetof(PyCodeObject, co_qualname)",
              "kCodeLinetable": "offsetof(PyCodeObject, co_linetable)",
              "kCodeFirstTraceable": "offsetof(PyCodeObject, _co_firsttraceable)",
              "kCodeUnits": "offsetof(PyCodeObject, co_code_adaptive)",
              "kVarSize": "offsetof(PyVarObject, ob_size)",
              "kBytesData": "offsetof(PyBytesObject, ob_sval)",
              "kStrLength": "offsetof(PyASCIIObject, length)",
              "kStrState": "offsetof(PyASCIIObject, state)",
              "kStrAsciiData": "sizeof(PyASCIIObject)",
              "kStrCompactData": "sizeof(PyCompactUnicodeObject)"}
    assert set(ours) == set(fields)
    prog = tmp_path / "offsets.c"
    prog.write_text("#define Py_BUILD_CORE 1\n#include <Python.h>\n#include <stddef.h>\n#include <stdio.h>\n"
                    "#include \"internal/pycore_frame.h\"\nint main(void) {\n" +
                    "".join(f'  printf("{k} %zu\\n", (size_t)({v}));\n' for k, v in fields.items()) +
                    "  printf(\"owner_by_generator %d\\n\", FRAME_OWNED_BY_GENERATOR);\n  return 0;\n}\n")
    include = subprocess.run([PY, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["cc", f"-I{include}", str(prog), "-o", str(tmp_path / "offsets")], check=True)
    out = subprocess.run([str(tmp_path / "offsets")], capture_output=True, text=True, check=True).stdout
    theirs = dict(line.split() for line in out.splitlines())
    assert theirs.pop("owner_by_generator") == "1"
    assert {k: int(v) for k, v in ours.items()} == {k: int(v) for k, v in theirs.items()}


def test_bad_input_gets_one_clear_line(ebb_bin, tmp_path):
    junk = tmp_path / "junk.ebbprof"
    junk.write_bytes(b"not a capture at all, just some bytes" * 4)
    r = subprocess.run([ebb_bin, "profile", "report", str(junk)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"ebb profile report: {junk}: not an ebb profile capture"
    r = subprocess.run([ebb_bin, "profile", "report", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot open" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([ebb_bin, "profile"], capture_output=True, text=True)
    assert r.returncode == 2 and "no command" in r.stderr
    r = subprocess.run([ebb_bin, "profile", "--rate", "lots", "--", "true"], capture_output=True, text=True)
    assert r.returncode == 2 and "--rate" in r.stderr
    r = subprocess.run([ebb_bin, "profile", "--", "no-such-command-here"], capture_output=True, text=True)
    assert r.returncode == 127 and "not found" in r.stderr


# A long-running process profiled in place: what it kept before the attach is
# not in the capture, what it did while attached is, and it runs on after.
SERVED = '''
import os, sys, time
def wait_for(name):
    while not os.path.exists(name):
        time.sleep(0.02)

def early():
    return [bytes(100_000) for _ in range(200)]          # EARLY: before the attach

def attached():
    return [bytes(100_000) for _ in range(300)]          # KEPT: 300 x 100,033 B, live at the detach

def churn():
    for _ in range(1000):
        b = bytes(100_000)                               # CHURN: allocated and freed
        del b

def after():
    return [bytes(100_000) for _ in range(400)]          # AFTER: once detached

early_data = early()
print("ready", flush=True)
for round in (1, 2):
    wait_for(f"go{round}")
    if round == 1:
        del early_data                                   # frees of objects the capture never saw
    kept = attached()
    churn()
    open(f"done{round}", "w").close()
    wait_for(f"detached{round}")
    late = after()
    open(f"after{round}", "w").close()
print("finished", len(kept), len(late), flush=True)
'''


def test_attach_to_a_running_process_and_detach(ebb_bin, ebb_lib, preload_env, tmp_path):
    script = tmp_path / "prog.py"  # at_line looks for this name
    script.write_text(SERVED)
    env = dict(preload_env, EBB_TELEMETRY="1", EBB_TELEMETRY_DIR=str(tmp_path / "pages"))
    target = subprocess.Popen([PY, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # the purger thread has made the page
        for round in (1, 2):
            prefix = tmp_path / f"attach{round}"
            mode = ["--all"] if round == 1 else ["--rate", "16K"]  # exact, then sampled
            prof = subprocess.Popen([ebb_bin, "profile", "--pid", str(target.pid), *mode, "-o", str(prefix)],
                                    stderr=subprocess.PIPE, text=True)
            line = prof.stderr.readline()
            assert "profiling process" in line, line + prof.stderr.read()
            (tmp_path / f"go{round}").touch()
            deadline = time.time() + 60
            while not (tmp_path / f"done{round}").exists():
                assert time.time() < deadline and target.poll() is None
                time.sleep(0.02)
            prof.send_signal(signal.SIGINT)
            rest = prof.communicate(timeout=30)[1]
            assert prof.returncode == 0, line + rest
            capture = Path(f"{prefix}.{target.pid}.ebbprof")
            assert f"ebb profile report {capture}" in rest
            size = capture.stat().st_size
            (tmp_path / f"detached{round}").touch()
            while not (tmp_path / f"after{round}").exists():
                assert time.time() < deadline and target.poll() is None
                time.sleep(0.02)

            end, total = report(ebb_bin, capture, "end"), report(ebb_bin, capture, "total")
            kept, churned = at_line(end, "KEPT", SERVED), at_line(total, "CHURN", SERVED)
            if round == 1:
                # The 300 objects, and the list comprehension's list of them (2.4 KB).
                assert 300 * 100_033 < kept < 300 * 100_033 + 4096
                assert churned == 1000 * 100_033
            else:
                assert kept == pytest.approx(300 * 100_033, rel=0.1)
                assert churned == pytest.approx(1000 * 100_033, rel=0.1)
            assert at_line(total, "EARLY", SERVED) == 0 and at_line(total, "AFTER", SERVED) == 0
            assert end["end"]["bytes"] >= kept if round == 1 else end["end"]["bytes"] > 0.9 * 300 * 100_033
        out = target.communicate(timeout=60)[0]
        assert target.returncode == 0 and "finished 300 400" in out
        assert capture.stat().st_size == size, "nothing is written after the detach"
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def test_attach_refusals_are_one_clear_line(ebb_bin, preload_env, tmp_path):
    def attach(pid, *extra):
        r = subprocess.run([*extra, ebb_bin, "profile", "--pid", str(pid), "--duration", "1s", "-o",
                            str(tmp_path / "x")], capture_output=True, text=True, timeout=30)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r

    gone = subprocess.Popen(["true"])
    gone.wait()
    r = attach(gone.pid)
    assert r.returncode == 2 and f"no process {gone.pid}" in r.stderr

    plain = subprocess.Popen(["sleep", "30"])
    no_telemetry = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"], env=preload_env)
    try:
        time.sleep(0.3)
        r = attach(plain.pid)
        assert r.returncode == 2 and "not libebb" in r.stderr, r.stderr
        r = attach(no_telemetry.pid)
        assert r.returncode == 2 and "without telemetry" in r.stderr, r.stderr
        if os.geteuid() == 0:
            # An unprivileged user cannot profile root's process.
            r = attach(plain.pid, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
            assert r.returncode == 2 and "belongs to another user" in r.stderr, r.stderr
    finally:
        for p in (plain, no_telemetry):
            p.kill()
            p.wait()
    r = subprocess.run([ebb_bin, "profile", "--pid", "1", "--", "true"], capture_output=True, text=True)
    assert r.returncode == 2 and "no command" in r.stderr
    r = subprocess.run([ebb_bin, "profile", "--pid", str(os.getpid()), "--duration", "soon"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--duration" in r.stderr


# ebb run --profile: every worker writes its own capture, named by worker id
# and pid, whether ebb execs it or forks it from the fork server.
WORKER = '''
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
def build():
    return [bytes(100_000) for _ in range(200)]          # KEEP: 200 x 100,033 B, to the end
kept = build()
os.write(1, f"ready {os.getpid()} {os.environ['EBB_WORKER_ID']}\\n".encode())
while True:
    time.sleep(1)
'''


@pytest.mark.parametrize("preload", [[], ["--preload", "json"]], ids=["exec", "fork-server"])
def test_run_profile_gives_every_worker_its_capture(fleet, tmp_path, preload):  # noqa: F811
    (tmp_path / "prog.py").write_text(WORKER)
    prefix = tmp_path / "fleet"
    f = fleet(["-w", "2", "--profile", str(prefix), "--profile-rate", "32K", *preload], [],
              command=[PY, str(tmp_path / "prog.py")], cwd=tmp_path)
    deadline = time.monotonic() + 30
    while len([x for x in f.stdout if x.startswith("ready")]) < 2:
        assert time.monotonic() < deadline, "".join(f.raw)
        time.sleep(0.05)
    config = f.of("config")[0]
    assert config["profile"] == str(prefix)
    assert f.stop() == 0
    workers = {line.split()[2]: line.split()[1] for line in f.stdout if line.startswith("ready")}
    assert sorted(workers) == ["1", "2"]
    for wid, pid in workers.items():
        capture = Path(f"{prefix}.w{wid}.{pid}.ebbprof")
        assert capture.exists(), sorted(os.listdir(tmp_path))
        rep = report(ebb_bin_of(f), capture, "end")
        assert rep["pid"] == int(pid)
        assert at_line(rep, "KEEP", WORKER) == pytest.approx(200 * 100_033, rel=0.1)
    # Nothing else was profiled: not ebb, not the fork server.
    assert sorted(p.name for p in tmp_path.glob("fleet.*")) == sorted(
        f"fleet.w{wid}.{pid}.ebbprof" for wid, pid in workers.items())


def ebb_bin_of(f):
    return f.argv[0]


def test_run_profile_refusals(ebb_bin, tmp_path):
    r = subprocess.run([ebb_bin, "run", "--profile", str(tmp_path / "x"), "--allocator", "system", "--", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--profile needs --allocator ebb" in r.stderr
    r = subprocess.run([ebb_bin, "run", "--profile", str(tmp_path / "x"), "--profile-rate", "often", "--", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--profile-rate" in r.stderr
    r = subprocess.run([ebb_bin, "run", "--profile", "/nonexistent/dir/x", "--", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot write captures in /nonexistent/dir" in r.stderr


API = '''
import errno, sys
import ebb
before = [bytes(100_000) for _ in range(50)]
path = ebb.profile_start(sys.argv[1], rate=1)
try:
    ebb.profile_start(sys.argv[1])
except OSError as e:
    assert e.errno == errno.EBUSY, e
else:
    raise AssertionError("a second start while profiling must fail")
def inside():
    return [bytes(100_000) for _ in range(70)]           # INSIDE: between start and stop
kept = inside()
assert ebb.profile_stop() is True and ebb.profile_stop() is False
after = [bytes(100_000) for _ in range(90)]
print(path)
'''


def test_python_can_start_and_stop_a_capture(ebb_bin, preload_env, tmp_path):
    (tmp_path / "prog.py").write_text(API)
    env = dict(preload_env, PYTHONPATH=str(REPO / "python"))
    r = subprocess.run([PY, str(tmp_path / "prog.py"), str(tmp_path / "api")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    capture = Path(r.stdout.strip())
    assert capture.name == f"api.{capture.name.split('.')[1]}.ebbprof" and capture.exists()
    total = report(ebb_bin, capture, "total")
    assert 70 * 100_033 < at_line(total, "INSIDE", API) < 70 * 100_033 + 4096
    assert total["total_bytes"] < 80 * 100_033  # nothing from before the start or after the stop


CHROMIUM = "/usr/bin/chromium"


def chromium(*args, timeout=90):
    """Debian's chromium, headless (as root it needs --no-sandbox)."""
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,1000", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_html_report_renders_in_chromium(ebb_bin, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: scripts/install-deps installs it")
    r, captures = profile(ebb_bin, tmp_path, ATTRIB, "--all")
    assert r.returncode == 0, r.stderr
    page = tmp_path / "report.html"
    r = subprocess.run([ebb_bin, "profile", "report", str(captures[0]), "--format", "html", "--leaks",
                        "-o", str(page)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"wrote {page}" in r.stderr, r.stderr
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, \
        "the page must not reach the network"
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    html = dom.stdout
    assert 'data-ready="1"' in html, "the page's script did not run to its end"
    # Opened at the end: build_cache keeps 60 MB, the largest own site and a flamegraph node of that size.
    first_site = re.search(r'<tr data-frame="([^"]+)">', html)
    assert first_site and first_site.group(1) == "build_cache", html[:2000]
    nodes = re.findall(r'data-frame="build_cache" data-depth="(\d+)" data-bytes="(\d+)"', html)
    assert nodes and int(nodes[0][1]) >= CACHE, nodes
    shot = tmp_path / "shot.png"
    s = chromium(f"--screenshot={shot}", page.as_uri())
    assert s.returncode == 0 and shot.exists(), s.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_table_explains_heap_and_rss(ebb_bin, tmp_path):
    script = ATTRIB + "\nimport time\ntime.sleep(0.6)  # the statistics are written four times a second\n"
    r, captures = profile(ebb_bin, tmp_path, script, "--rate", "64K")
    assert r.returncode == 0, r.stderr
    t = subprocess.run([ebb_bin, "profile", "report", str(captures[0]), "--leaks"], capture_output=True, text=True)
    assert t.returncode == 0, t.stderr
    assert "leaked (live at the end)" in t.stdout and "RSS " in t.stdout and "live " in t.stdout, t.stdout
    mem = report(ebb_bin, captures[0], "end")["memory"]
    assert mem["rss_bytes"] == mem["file_backed_bytes"] + mem["anonymous_bytes"]
    # libebb's exact count of the live heap holds what the script keeps (66 MB).
    assert mem["live_bytes"] >= CACHE + PARSE
    assert mem["heap_resident_bytes"] >= mem["live_bytes"]
    for bad in (["--inverted"], ["--leaks", "--at", "total"], ["-o", str(tmp_path / "x.html")], ["--format", "pdf"]):
        r = subprocess.run([ebb_bin, "profile", "report", str(captures[0]), *bad], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)

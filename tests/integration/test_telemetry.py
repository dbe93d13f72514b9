"""The telemetry page with live processes: ebb ps shows the heap, ebb trim
gives memory back (checked in /proc, not through ebb), the page goes away
with its process, and a forked child gets its own page."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_ps import PY, ebb

WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a normal exit on TERM
big = [str(i) * 20 for i in range(1_500_000)]
keep = big[::1000]
del big
if len(sys.argv) > 1:  # fork: the child must publish its own page
    child = os.fork()
    if child == 0:
        junk = [str(i) for i in range(100_000)]; del junk  # frees start its purger
        time.sleep(60); os._exit(0)
    print(child, flush=True)
print("ready", flush=True)
time.sleep(60)
"""


def rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def worker(tmp_path, preload_env):
    """A libebb worker with telemetry on, whose freed memory stays resident
    (purge delays of ten minutes) until someone trims it."""
    env = dict(preload_env, EBB_TELEMETRY="1", EBB_TELEMETRY_DIR=str(tmp_path / "pages"),
               EBB_PURGE_DELAY_MS="600000", EBB_EMPTY_DELAY_MS="600000")
    procs = []

    def start(*args):
        p = subprocess.Popen([PY, "-c", WORKER, *args], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        lines = []
        while True:
            line = p.stdout.readline()
            assert line, "worker died"
            if line.strip() == "ready":
                return p, lines
            lines.append(line.strip())

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def test_page_is_private_and_ps_shows_the_heap(ebb_bin, worker, tmp_path):
    p, _ = worker()
    page = tmp_path / "pages" / str(p.pid)
    assert page.exists()
    assert oct(page.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "pages").stat().st_mode & 0o777) == "0o700"
    # The page is republished every second: wait for the first one after the work.
    deadline = time.time() + 5
    while True:
        out = ebb(ebb_bin, "ps", "--json", str(p.pid))
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout)["processes"][0]
        if (row["heap"] or {}).get("free_resident", 0) > 50 * 1024 * 1024 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert row["allocator"] == "ebb"
    heap = row["heap"]
    assert heap is not None, "no heap figures from the page"
    assert heap["version"].startswith("ebb ")
    assert heap["live"] > 0
    # ~100 MB of strings were freed but (delay 10 min) are still resident.
    assert heap["free_resident"] > 50 * 1024 * 1024


def test_trim_gives_memory_back(ebb_bin, worker):
    p, _ = worker()
    before = rss(p.pid)
    out = ebb(ebb_bin, "trim", str(p.pid))
    after = rss(p.pid)
    assert out.returncode == 0, out.stderr
    assert before - after > 50 * 1024 * 1024, (before, after)
    line = out.stdout.splitlines()[1].split()
    assert int(line[0]) == p.pid
    assert line[3].endswith("M")  # RELEASED, tens of MB


def test_trim_all_finds_the_workers(ebb_bin, worker, tmp_path):
    p, _ = worker()
    env = dict(os.environ, EBB_TELEMETRY_DIR=str(tmp_path / "pages"))
    out = subprocess.run([ebb_bin, "trim", "--all"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert str(p.pid) in out.stdout


def test_trim_of_a_glibc_process_explains_malloc_trim(ebb_bin):
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        out = ebb(ebb_bin, "trim", str(sleeper.pid))
        assert out.returncode == 1
        assert "glibc" in out.stderr and "malloc_trim(0)" in out.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_trim_needs_a_target(ebb_bin):
    out = ebb(ebb_bin, "trim")
    assert out.returncode == 2
    assert "PID or --all" in out.stderr


def test_page_goes_with_its_process_and_fork_child_has_its_own(ebb_bin, worker, tmp_path):
    p, lines = worker("fork")
    child = int(lines[0])
    pages = tmp_path / "pages"
    deadline = time.time() + 10
    while not (pages / str(child)).exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (pages / str(child)).exists(), "the forked child published no page"
    out = ebb(ebb_bin, "ps", "--json", str(p.pid), str(child))
    rows = {r["pid"]: r for r in json.loads(out.stdout)["processes"]}
    assert rows[child]["heap"] is not None and rows[p.pid]["heap"] is not None
    os.kill(child, signal.SIGKILL)  # no chance to clean up: its page stays, stale
    p.terminate()
    assert p.wait(timeout=10) == 0
    assert not (pages / str(p.pid)).exists(), "page left behind by a normal exit"
    # ebb's readers remove the stale page of the killed child.
    env = dict(os.environ, EBB_TELEMETRY_DIR=str(pages))
    deadline = time.time() + 10
    while (pages / str(child)).exists() and time.time() < deadline:
        subprocess.run([ebb_bin, "trim", "--all"], capture_output=True, env=env, timeout=60)
        time.sleep(0.1)
    assert not (pages / str(child)).exists(), "stale page of a killed process not cleaned up"

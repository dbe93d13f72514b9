"""`ebb run --preload`: workers forked from a Python fork server (a zygote).

Each test starts a real `ebb run --log-format json` and reads its decisions;
the workers are small Python programs written into the test's directory.
Every wait is bounded.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from test_run import (APPS, FAST, LEAKER, PY, PYTHON_DIR, assert_exactly_once, celery_task, fleet,  # noqa: F401
                      redis_url)

# A worker that reports how it was started, as JSON on one stdout line. The
# line goes out in one write(2) (atomic on a pipe below 4 KiB): print() under
# `python3 -u` writes the text and the newline apart, and two workers' lines
# could interleave.
REPORT = r'''
import gc, json, os, signal, sys
import __main__
os.write(1, (json.dumps({
    "argv": sys.argv, "name": __name__, "main_is_sys_main": sys.modules["__main__"].__dict__ is globals(),
    "file": globals().get("__file__"), "spec": getattr(__spec__, "name", None), "path0": sys.path[0],
    "sigint": str(signal.getsignal(signal.SIGINT)), "sigterm": str(signal.getsignal(signal.SIGTERM)),
    "sigchld": str(signal.getsignal(signal.SIGCHLD)), "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "gc": gc.isenabled(), "worker": os.environ.get("EBB_WORKER_ID"), "pid": os.getpid(), "ppid": os.getppid(),
    "pgid": os.getpgid(0), "frozen": gc.get_freeze_count(), "preloaded": "heavy" in sys.modules,
}) + "\n").encode())
if os.environ.get("REPORT_WAIT"):
    signal.pause()
'''

HEAVY = '''
VERSION = "v1"
TABLE = {i: (str(i) * 4, [i, i * 2]) for i in range(200_000)}  # ~40 MB of objects, shared by the workers
'''


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "report.py").write_text(REPORT)
    (tmp_path / "heavy.py").write_text(HEAVY)
    pkg = tmp_path / "reportpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(REPORT)
    return tmp_path


@pytest.fixture
def zfleet(fleet):
    """`fleet` (test_run.py) for a whole worker COMMAND run in a directory."""
    return lambda options, command, env=None, cwd=None: fleet(options, [], env, command=command, cwd=cwd)


def reports(f, count, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with f._lock:
            found = [json.loads(x) for x in f.stdout if x.startswith("{")]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} reports not seen; log:\n" + "".join(f.raw))


def plain_report(cwd, command, env=None):
    """What the same command reports when Python runs it directly."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "LD_PRELOAD"}
    e.update(env or {})
    out = subprocess.run(command, cwd=cwd, env=e, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout.splitlines()[-1])


SAME = ("argv", "name", "main_is_sys_main", "file", "spec", "path0", "sigint", "sigterm", "sigchld", "mask")


@pytest.mark.parametrize("command", [
    [PY, "report.py", "a", "--b"],
    [PY, "-u", "-m", "reportpkg", "x", "-y"],
    [PY, "-c", "exec(open('report.py').read())", "z"],
], ids=["script", "module", "code"])
def test_worker_sees_the_command_as_python_would_run_it(zfleet, app_dir, command):
    """sys.argv, __main__, __file__, __spec__, sys.path[0] and signal state as
    under plain `python3`; plus gc back on, the preload frozen, and the worker
    a child of ebb in its own process group."""
    f = zfleet(["-w", "2", "--preload", "heavy", *FAST], command, env={"REPORT_WAIT": "1"}, cwd=str(app_dir))
    got = reports(f, 2)
    want = plain_report(app_dir, command)
    for r in got:
        for key in SAME:
            assert r[key] == want[key], (key, r[key], want[key])
        assert r["gc"] is True
        assert r["preloaded"] and not want["preloaded"]
        assert r["frozen"] > 10_000  # the preloaded heap sits in the permanent generation
        assert r["ppid"] == f.proc.pid  # adopted by ebb, which waits for it
        assert r["pgid"] == r["pid"]
    assert sorted(r["worker"] for r in got[:2]) == ["1", "2"]
    ready = f.wait_for("ready")[0]
    assert ready["preload"]["modules"][0]["name"] == "heavy"
    assert f.stop() == 0


def test_workers_share_the_preloaded_heap(zfleet, app_dir):
    """The workers reach the preloaded data copy-on-write: most of their RSS is
    shared (with libebb, the default allocator, too)."""
    f = zfleet(["-w", "3", "--preload", "heavy", *FAST], [PY, "report.py"], env={"REPORT_WAIT": "1"},
               cwd=str(app_dir))
    pids = [r["pid"] for r in reports(f, 3)]
    time.sleep(1)  # past libebb's purge delay: what is private now stays private
    for pid in pids:
        smaps = dict(line.split(":") for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:])
        kb = {k: int(v.split()[0]) for k, v in smaps.items()}
        private = kb["Private_Clean"] + kb["Private_Dirty"]
        assert kb["Rss"] > 40_000, kb  # the table is mapped...
        assert private < kb["Rss"] / 4, kb  # ...and not copied
    assert f.stop() == 0


def test_workers_and_fork_server_say_who_they_are(zfleet, app_dir):
    """ps and top show each worker by number and command, and the fork server
    as such, in both the command line (python3-setproctitle) and comm."""
    f = zfleet(["-w", "2", "--preload", "heavy", *FAST], [PY, "report.py", "--flag"], env={"REPORT_WAIT": "1"},
               cwd=str(app_dir))
    by_id = {r["worker"]: r["pid"] for r in reports(f, 2)}
    zygote = f.wait_for("ready")[0]["zygote"]

    def names(pid):
        comm = open(f"/proc/{pid}/comm").read().strip()
        ps = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        return comm, ps

    for wid, pid in by_id.items():
        assert names(pid) == (f"ebb worker {wid}", f"ebb worker {wid}: python3 report.py --flag")
    assert names(zygote) == ("ebb forkserver", "ebb fork server: python3 report.py --flag")
    assert f.stop() == 0


def test_recycled_workers_are_forked_again(zfleet):
    """The whole policy applies: a worker over its hard limit is recycled
    gracefully and its replacement comes from the same fork server."""
    f = zfleet(["-w", "2", "--hard-limit", "60M", "--grace", "10s", "--preload", "argparse", *FAST],
               [PY, LEAKER, "--leak", "4", "--task", "0.1"])
    first = f.wait_for("recycle", reason="hard limit")[0]
    ex = f.wait_for("exit", pid=first["pid"])[0]
    assert ex.get("status") == 0 and not ex.get("killed")
    assert len(f.wait_for("start", worker=first["worker"])) >= 2
    assert not f.of("zygote", reason="restart"), "one fork server served every start"
    assert f.stop() == 0


def test_a_worker_that_crashes_at_start_backs_off(zfleet, app_dir):
    (app_dir / "crash.py").write_text("import sys\nsys.exit(3)\n")
    f = zfleet(["--preload", "heavy", *FAST], [PY, "crash.py"], cwd=str(app_dir))
    exits = f.wait_for("exit", count=4, timeout=20)
    assert all(e["status"] == 3 for e in exits)
    delays = [e["restart_in_s"] for e in exits]
    assert delays[0] == 0 and delays[3] > delays[2] > 0, delays
    assert not f.of("zygote", reason="restart"), "the fork server itself is fine"
    assert f.stop() == 1


def test_import_failure_names_the_module_and_stops(zfleet, app_dir):
    (app_dir / "broken.py").write_text("import os\nraise RuntimeError('no config file')\n")
    f = zfleet(["--preload", "heavy,broken", *FAST], [PY, "report.py"], cwd=str(app_dir))
    assert f.proc.wait(timeout=30) == 1
    f.stop()
    err = f.wait_for("error")[0]
    assert err["module"] == "broken" and "RuntimeError: no config file" in err["error"]
    assert "broken.py" in err["traceback"]
    assert any("RuntimeError: no config file" in line for line in f.raw)  # the traceback, on stderr
    assert not f.of("start"), "no worker started"


def test_import_failure_with_fallback_runs_plain_workers(zfleet, app_dir):
    f = zfleet(["-w", "2", "--preload", "nosuchmodule", "--preload-fallback", *FAST], [PY, "report.py"],
               env={"REPORT_WAIT": "1"}, cwd=str(app_dir))
    got = reports(f, 2)
    assert f.of("fallback")
    assert all(not r["preloaded"] and r["frozen"] == 0 for r in got)
    assert f.stop() == 0


def test_a_missing_worker_script_is_reported_before_any_start(zfleet, app_dir):
    f = zfleet(["--preload", "heavy", *FAST], [PY, "nosuch.py"], cwd=str(app_dir))
    assert f.proc.wait(timeout=30) == 1
    f.stop()
    assert "nosuch.py" in f.wait_for("error")[0]["error"]
    assert not f.of("start")


def test_threads_and_sockets_opened_at_import_are_warned_about(zfleet, app_dir):
    (app_dir / "chatty.py").write_text(
        "import socket, threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), name='poller', daemon=True).start()\n"
        "conn = socket.socket()\n")
    f = zfleet(["--preload", "chatty", *FAST], [PY, "report.py"], env={"REPORT_WAIT": "1"}, cwd=str(app_dir))
    reports(f, 1)
    warnings = [w["warning"] for w in f.of("warning")]
    assert any("chatty started 1 Python thread" in w and "poller" in w for w in warnings), warnings
    assert any("chatty opened 1 socket" in w for w in warnings), warnings
    assert f.stop() == 0


def test_non_python_command_is_refused(ebb_bin, tmp_path):
    r = subprocess.run([ebb_bin, "run", "--preload", "json", "--", "/bin/sleep", "1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and not r.stdout
    assert "/bin/sleep is not a Python program" in r.stderr and len(r.stderr.splitlines()) == 1
    r = subprocess.run([ebb_bin, "run", "--preload", "json", "--children", "--", PY, "-c", "pass"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--children" in r.stderr


def test_zygote_death_is_survived(zfleet, app_dir):
    """The fork server is killed: the workers go on, a new one is started,
    and the next worker comes from it."""
    f = zfleet(["-w", "2", "--preload", "heavy", *FAST], [PY, "report.py"], env={"REPORT_WAIT": "1"},
               cwd=str(app_dir))
    pids = [r["pid"] for r in reports(f, 2)]
    zygote = f.wait_for("ready")[0]["zygote"]
    os.kill(zygote, signal.SIGKILL)
    f.wait_for("ready", count=2, timeout=30)
    for pid in pids:
        os.kill(pid, 0)  # still running
    os.kill(pids[0], signal.SIGTERM)
    got = reports(f, 3)
    assert got[2]["preloaded"] and got[2]["ppid"] == f.proc.pid
    assert f.stop() == 0


def test_hup_reimports_and_a_broken_reload_changes_nothing(zfleet, app_dir):
    """SIGHUP imports the new code in a new fork server, then replaces the
    workers from it; if the new code does not import, nothing changes."""
    (app_dir / "ver.py").write_text("import heavy, os\nprint('version', heavy.VERSION, os.getpid(), flush=True)\n"
                                    "import signal\nsignal.pause()\n")
    # (no .pyc: a rewrite within the same second, of the same size, would look unchanged)
    f = zfleet(["-w", "2", "--preload", "heavy", *FAST], [PY, "ver.py"], env={"PYTHONDONTWRITEBYTECODE": "1"},
               cwd=str(app_dir))
    f.wait_for("start", count=2)
    deadline = time.monotonic() + 20
    while sum(s.startswith("version v1") for s in f.stdout) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (app_dir / "heavy.py").write_text(HEAVY.replace("v1", "v2"))
    f.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while sum(s.startswith("version v2") for s in f.stdout) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(s.startswith("version v2") for s in f.stdout) >= 2, "".join(f.raw)
    starts = len(f.of("start"))
    (app_dir / "heavy.py").write_text("raise ImportError('half-deployed')\n")
    f.proc.send_signal(signal.SIGHUP)
    err = f.wait_for("error", timeout=30)[0]
    assert "reload failed" in err["message"] and "half-deployed" in err["error"]
    time.sleep(1)
    assert len(f.of("start")) == starts, "a broken reload recycles nobody"
    assert f.stop() == 0


def test_rq_jobs_through_the_fork_server(zfleet, redis_url):  # noqa: F811
    """RQ's console script (a #! python3 script) under --preload, recycled at
    its hard limit: every job runs exactly once."""
    import redis
    from rq import Queue
    r = redis.Redis.from_url(redis_url)
    q = Queue("default", connection=r)
    jobs = 300
    for i in range(jobs):
        q.enqueue("rq_jobs.work", i, "x" * 400_000)
    f = zfleet(["-w", "2", "--hard-limit", "60M", "--metric", "rss", "--grace", "30s",
                "--preload", "rq,redis,rq_jobs,ebb.rq", *FAST],
               ["/usr/bin/rq", "worker", "--url", redis_url, "--worker-class", "ebb.rq.SimpleWorker", "--quiet",
                "default"],
               env={"EBB_TEST_REDIS": redis_url, "PYTHONPATH": f"{APPS}:{PYTHON_DIR}"})
    assert_exactly_once(f, r, jobs, min_recycles=2, timeout=120)
    assert not f.of("zygote", reason="restart"), "one fork server served every start"


def test_celery_tasks_through_the_fork_server(zfleet, redis_url):  # noqa: F811
    import redis
    work = celery_task(redis_url)
    tasks = 300
    for i in range(tasks):
        work.delay(i, "x" * 400_000)
    f = zfleet(["-w", "2", "--hard-limit", "70M", "--metric", "rss", "--grace", "30s",
                "--preload", "celery_app,ebb.celery", *FAST],
               [PY, "-m", "ebb.celery", "-A", "celery_app", "worker", "--pool=solo", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-l", "warning"],
               env={"EBB_TEST_REDIS": redis_url, "PYTHONPATH": f"{APPS}:{PYTHON_DIR}"})
    assert_exactly_once(f, redis.Redis.from_url(redis_url), tasks, min_recycles=2, timeout=180)
    assert not f.of("zygote", reason="restart"), "one fork server served every start"


def test_ps_fleet_shows_what_workers_share_with_the_fork_server(zfleet, app_dir, ebb_bin, tmp_path):
    sock = str(tmp_path / "st.sock")
    f = zfleet(["-w", "2", "--preload", "heavy", "--status-socket", sock, "--metrics", "127.0.0.1:0", *FAST],
               [PY, "report.py"], env={"REPORT_WAIT": "1"}, cwd=str(app_dir))
    reports(f, 2)
    time.sleep(1)
    j = json.loads(subprocess.run([ebb_bin, "ps", "--fleet", sock, "--json"], capture_output=True, text=True,
                                  timeout=30, check=True).stdout)
    assert j["zygote"]["pid"] == f.wait_for("ready")[0]["zygote"]
    for w in j["workers"]:
        assert w["pss"] < w["rss"] and w["uss"] < w["rss"] / 4
        if os.geteuid() == 0:  # page frames need root
            assert w["shared_with_zygote"] > 30 << 20, w  # the preloaded table, at least
            assert w["shared_with_zygote"] <= w["shared"]
    text = subprocess.run([ebb_bin, "ps", "--fleet", sock], capture_output=True, text=True, timeout=30,
                          check=True).stdout
    assert "ZYGOTE" in text.splitlines()[0] and "fork server" in text
    assert "the workers share" in text
    address = f.wait_for("metrics")[0]["address"]
    import urllib.request
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "ebb_zygote_memory_bytes " in metrics and "ebb_zygote_restarts_total 0" in metrics
    assert f.stop() == 0


def test_what_preloaded_modules_set_at_import_reaches_the_workers(zfleet, app_dir):
    """A signal handler installed and the collector turned off by a preloaded
    module at import are what the worker has, as in a plain run."""
    (app_dir / "setup_app.py").write_text(
        "import gc, signal\n"
        "def graceful(signum, frame): pass\n"
        "signal.signal(signal.SIGTERM, graceful)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "gc.disable()\n")
    (app_dir / "check.py").write_text(
        "import gc, json, signal, setup_app\n"
        "print(json.dumps({'term': getattr(signal.getsignal(signal.SIGTERM), '__name__', None),\n"
        "                  'hup_ignored': signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, 'gc': gc.isenabled()}), flush=True)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "signal.pause()\n")
    f = zfleet(["--preload", "setup_app", *FAST], [PY, "check.py"], cwd=str(app_dir))
    got = reports(f, 1)[0]
    assert got == {"term": "graceful", "hup_ignored": True, "gc": False}, got
    assert f.stop() == 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hup_while_the_first_import_hangs_starts_the_workers(zfleet, app_dir):
    """The app hangs at import; the code is fixed and ebb gets SIGHUP: the new
    fork server starts every worker, the hung one is killed, and ebb idles
    (no busy loop) afterwards."""
    (app_dir / "flag").write_text("")
    (app_dir / "slow.py").write_text("import os, time\nif os.path.exists('flag'):\n    time.sleep(3600)\n")
    f = zfleet(["-w", "2", "--preload", "slow", *FAST], [PY, "report.py"], env={"REPORT_WAIT": "1"},
               cwd=str(app_dir))
    hung = f.wait_for("zygote")[0]["zygote"]
    time.sleep(0.5)
    assert not f.of("start")
    (app_dir / "flag").unlink()
    f.proc.send_signal(signal.SIGHUP)
    got = reports(f, 2)
    assert sorted(r["worker"] for r in got) == ["1", "2"]
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{hung}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{hung}"), "the hung fork server was killed"
    before = cpu_seconds(f.proc.pid)
    time.sleep(2)
    assert cpu_seconds(f.proc.pid) - before < 0.5, "ebb spins while the fleet is idle"
    assert f.stop() == 0


def test_a_stuck_fork_server_blocks_nothing_and_is_replaced(zfleet, app_dir, ebb_bin, tmp_path):
    """The fork server stops answering (SIGSTOP) while a worker must be
    replaced: ebb keeps answering its status socket, kills the fork server
    after the fork timeout, and the next one starts the worker."""
    sock = str(tmp_path / "st.sock")
    f = zfleet(["--preload", "heavy", "--status-socket", sock, *FAST], [PY, "report.py"],
               env={"REPORT_WAIT": "1"}, cwd=str(app_dir))
    first = reports(f, 1)[0]
    zygote = f.wait_for("ready")[0]["zygote"]
    os.kill(zygote, signal.SIGSTOP)
    os.kill(first["pid"], signal.SIGKILL)
    f.wait_for("exit", pid=first["pid"])
    time.sleep(0.5)
    r = subprocess.run([ebb_bin, "ps", "--fleet", sock, "--json"], capture_output=True, text=True, timeout=5)
    assert r.returncode == 0 and json.loads(r.stdout)["workers"] == []  # answered while the fork is pending
    err = f.wait_for("error", timeout=30)[0]
    assert "did not fork worker 1" in err["message"]
    got = reports(f, 2, timeout=30)
    assert got[1]["pid"] != first["pid"] and got[1]["preloaded"]
    assert f.wait_for("ready", count=2)[1]["zygote"] != zygote
    assert f.stop() == 0


# Preloaded: about 20 MB in bytes objects of many sizes; it says what it
# keeps as Python counts it. The worker imports email.parser after the fork.
PRELOADED = '''
import sys
KEEP = [bytes(200 + (i * 7919) % 4000) for i in range(9500)]
KEPT = sum(sys.getsizeof(x) for x in KEEP) + sys.getsizeof(KEEP)
'''
AFTER = r'''
import json, os, signal
import email.parser
import preloaded
os.write(1, (json.dumps({"pid": os.getpid(), "kept": preloaded.KEPT}) + "\n").encode())
signal.pause()
'''


def test_ps_fleet_imports_shows_the_preload_tree_and_each_workers_own(zfleet, app_dir, ebb_bin, tmp_path):
    (app_dir / "preloaded.py").write_text(PRELOADED)
    (app_dir / "after.py").write_text(AFTER)
    sock = str(tmp_path / "st.sock")
    f = zfleet(["-w", "2", "--preload", "preloaded", "--status-socket", sock, *FAST], [PY, "after.py"],
               cwd=str(app_dir))
    found = reports(f, 2)
    kept = found[0]["kept"]
    assert f.wait_for("ready")[0]["preload"]["imports"]["modules"] >= 1
    time.sleep(0.5)
    r = subprocess.run([ebb_bin, "ps", "--fleet", sock, "--imports", "--json"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    tree = j["imports"]["preload"]["tree"]
    node = next(n for n in tree if n["name"] == "preloaded")
    assert abs(node["live"] - kept) < 0.05 * kept, (node["live"], kept)
    assert j["imports"]["preload"]["counters"] == "libebb"
    for w in found:
        lines = j["imports"]["workers"][str(w["pid"])]
        names = [x["name"] for x in lines]
        assert "email.parser" in names and "preloaded" not in names, names  # shared, not imported again
        assert sum(x["modules"] for x in lines) >= 5 and sum(x["live"] for x in lines) > 100_000, lines
    text = subprocess.run([ebb_bin, "ps", "--fleet", sock, "--imports"], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert "Imported by the fork server before the fork, shared by every worker:" in text
    assert any(line.rstrip().endswith(" preloaded  (ebb run --preload)") for line in text.splitlines()), text
    rows = text[text.index("Imported by each worker after the fork"):].splitlines()[2:]
    assert len(rows) == 2 and all("email" in row for row in rows), text
    base = sock + ".imports"
    assert os.path.exists(base + ".json") and os.path.exists(f"{base}.{found[0]['pid']}.jsonl")
    assert f.stop() == 0
    left = [p for p in os.listdir(tmp_path) if p.startswith("st.sock")]
    assert left == [], left


def test_ps_fleet_imports_needs_a_preload_fleet(zfleet, app_dir, ebb_bin, tmp_path):
    sock = str(tmp_path / "st.sock")
    f = zfleet(["--status-socket", sock, *FAST], [PY, "report.py"], env={"REPORT_WAIT": "1"}, cwd=str(app_dir))
    reports(f, 1)
    r = subprocess.run([ebb_bin, "ps", "--fleet", sock, "--imports"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "ebb ps: this fleet has no fork server: the import trees need `ebb run --preload MODULES --status-socket "
        "PATH` (or it is being restarted)"]
    r = subprocess.run([ebb_bin, "ps", "--imports"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--imports goes with --fleet" in r.stderr
    assert f.stop() == 0

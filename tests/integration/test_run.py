"""`ebb run` policy tests with small Python workers that leak at a set rate.

Each test starts `ebb run --log-format json`, reads its decisions (one JSON
object per stderr line) as they happen, and stops it with SIGTERM. Workers
are tests/integration/workers/leaker.py. Times are kept short with
--interval; every wait is bounded.
"""
import json
import os
import re
import urllib.request
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

LEAKER = str(Path(__file__).resolve().parent / "workers" / "leaker.py")
APPS = str(Path(__file__).resolve().parent / "apps")
PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")  # the ebb package
PY = "/usr/bin/python3"


class Fleet:
    """A running `ebb run`; its JSON log lines gathered in self.events."""

    def __init__(self, ebb_bin, ebb_lib, options, worker_args, env=None, cwd=None, command=None):
        e = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
        e["EBB_LIB"] = ebb_lib
        e.update(env or {})
        command = command or [PY, LEAKER, *worker_args]
        self.argv = [ebb_bin, "run", "--log-format", "json", *options, "--", *command]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=e, cwd=cwd)
        self.events = []
        self.stdout = []
        self.raw = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self):
        for line in self.proc.stderr:
            with self._lock:
                self.raw.append(line)
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a worker's own stderr

    def _read_out(self):
        for line in self.proc.stdout:
            with self._lock:
                self.stdout.append(line.strip())

    def of(self, event, **fields):
        with self._lock:
            return [e for e in self.events
                    if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]

    def wait_for(self, event, count=1, timeout=20, **fields):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(event, **fields)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count} '{event}' {fields} events in {timeout}s; log:\n" + "".join(self.raw))

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for t in self._threads:
            t.join(timeout=5)
        return code


@pytest.fixture
def fleet(ebb_bin, ebb_lib):
    started = []

    def start(options, worker_args, env=None, command=None, cwd=None):
        f = Fleet(ebb_bin, ebb_lib, options, worker_args, env, command=command, cwd=cwd)
        started.append(f)
        return f

    yield start
    # A test that failed left its fleet running: SIGKILL to ebb alone would
    # leave its workers (and a gunicorn master's successor) running on into
    # the next tests, so all of ebb's descendants go with it.
    for f in started:
        if f.proc.poll() is None:
            try:
                left = psutil.Process(f.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                left = []
            f.proc.kill()
            f.proc.wait()
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


FAST = ["--interval", "0.2s", "--min-uptime", "1s"]


def test_hard_limit_recycles_gracefully(fleet):
    f = fleet(["-w", "2", "--hard-limit", "60M", "--grace", "10s", *FAST], ["--leak", "4", "--task", "0.1"])
    recycles = f.wait_for("recycle", reason="hard limit")
    first = recycles[0]
    assert first["mem"] > 0
    exits = f.wait_for("exit", pid=first["pid"])
    # It finished its task and left on SIGTERM, well within the grace.
    assert exits[0].get("status") == 0 and not exits[0].get("killed")
    assert f"stop {first['pid']}" in f.stdout
    # Its slot got a new worker (started first: no budget to respect here).
    assert first["replacement_first"] is True
    assert len(f.wait_for("start", worker=first["worker"])) >= 2
    # Trimming was tried before recycling.
    trims = f.of("trim", pid=first["pid"], reason="hard limit")
    assert trims, "a worker over its hard limit is trimmed before it is recycled"
    assert f.stop() == 0
    assert not f.of("kill")


def test_term_then_kill_after_grace(fleet):
    f = fleet(["--hard-limit", "50M", "--grace", "1s", *FAST], ["--leak", "4", "--task", "0.1", "--ignore-term"])
    r = f.wait_for("recycle", reason="hard limit")[0]
    k = f.wait_for("kill", pid=r["pid"])[0]
    ex = f.wait_for("exit", pid=r["pid"])[0]
    assert ex.get("signal") == signal.SIGKILL and ex.get("killed") is True
    # The kill came after the grace, not before.
    t = lambda e: time.mktime(time.strptime(e["time"][:19], "%Y-%m-%dT%H:%M:%S")) + float(e["time"][19:-1] or 0)
    assert t(k) - t(r) >= 0.9
    f.stop()


# The worker builds its garbage in well under a second after it starts; the
# first sample comes 1.5 s after start, so ebb sees the garbage already freed.
SLOW = ["--interval", "1.5s", "--min-uptime", "1s"]


def wait_trim(f, reason, ok, timeout=30):
    """The first trim for `reason` that satisfies ok(event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in f.of("trim", reason=reason):
            if ok(t):
                return t
        time.sleep(0.1)
    raise AssertionError(f"no such '{reason}' trim in {timeout}s; log:\n" + "".join(f.raw))


def test_soft_limit_trims_and_rss_drops(fleet):
    # Long purge delays keep the churned garbage resident: only the soft
    # limit (libebb's eager purging above it, and ebb's trim) brings it down.
    f = fleet(["--soft-limit", "60M", "--metric", "rss", "--trim-cooldown", "1s", *SLOW],
              ["--churn-once", "60", "--task", "0.3"], env={"EBB_PURGE_DELAY_MS": "600000", "EBB_EMPTY_DELAY_MS": "600000"})
    t = wait_trim(f, "soft limit", lambda t: "error" not in t)
    assert t["mem"] > 60 << 20
    assert t["rss_after"] < 60 << 20, t
    assert f.stop() == 0


def test_a_trim_spares_a_recycle(fleet):
    # Over the hard limit only because of free memory: the trim gives it back
    # and the worker is not recycled.
    f = fleet(["--hard-limit", "60M", "--metric", "rss", "--trim-cooldown", "1s", *SLOW],
              ["--churn-once", "60", "--task", "0.3"], env={"EBB_PURGE_DELAY_MS": "600000", "EBB_EMPTY_DELAY_MS": "600000"})
    t = wait_trim(f, "hard limit", lambda t: "error" not in t)
    assert t["released"] > 20 << 20, t
    assert t["rss_after"] < t["rss_before"] - (20 << 20), t
    time.sleep(3.5)  # two more samples
    assert not f.of("recycle"), f.raw
    assert f.stop() == 0


def test_jitter_spreads_limits(fleet):
    f = fleet(["-w", "6", "--hard-limit", "1G", "--jitter", "20", *FAST], ["--task", "0.5"])
    starts = f.wait_for("start", count=6)
    limits = [s["hard_limit"] for s in starts]
    assert all(0.8 * (1 << 30) <= x <= 1 << 30 for x in limits), limits
    assert len(set(limits)) == 6, limits
    assert f.stop() == 0


def test_never_more_than_k_stopping(fleet):
    # Every worker is over its limit at once and slow to stop.
    f = fleet(["-w", "4", "--hard-limit", "40M", "--grace", "1.5s", "--max-recycling", "2", *FAST],
              ["--leak", "6", "--task", "0.1", "--ignore-term"])
    f.wait_for("kill", count=4, timeout=40)
    f.stop()
    stopping = set()
    peak = 0
    for e in f.events:
        if e["event"] == "recycle":
            stopping.add(e["pid"])
        elif e["event"] == "exit":
            stopping.discard(e["pid"])
        peak = max(peak, len(stopping))
    assert peak == 2


def test_crash_loop_backs_off(fleet):
    f = fleet(FAST, ["--exit-after", "0.01", "--exit-code", "3"])
    exits = f.wait_for("exit", count=4, timeout=20)
    delays = [e["restart_in_s"] for e in exits]
    assert delays[0] == 0 and delays[1] > 0 and delays[3] > delays[2] > 0, delays
    assert all(e["status"] == 3 for e in exits)
    assert f.stop() == 1  # the fleet was not healthy


def test_fleet_budget_recycles_the_largest(fleet):
    # Worker k leaks k MB per task: worker 3 is the largest.
    f = fleet(["-w", "3", "--total-limit", "150M", "--trim-cooldown", "2s", *FAST],
              ["--leak-per-id", "1.5", "--task", "0.1"])
    budget = f.wait_for("recycle", reason="fleet budget", timeout=30)[0]
    assert budget["worker"] == 3, budget
    assert f.of("trim", reason="fleet budget"), "the fleet is trimmed before a worker is recycled"
    f.stop()


def test_sigterm_stops_every_worker_gracefully(fleet):
    f = fleet(["-w", "3", *FAST], ["--task", "0.2"])
    starts = f.wait_for("start", count=3)
    time.sleep(0.5)
    assert f.stop() == 0
    for s in starts:
        assert f"stop {s['pid']}" in f.stdout
    assert f.wait_for("stopped")[0]["exit_code"] == 0


def test_hup_restarts_every_worker_and_ttin_ttou_scale(fleet):
    f = fleet(["-w", "2", *FAST], ["--task", "0.1"])
    first = {s["pid"] for s in f.wait_for("start", count=2)}
    f.proc.send_signal(signal.SIGHUP)
    recycled = f.wait_for("recycle", count=2, reason="reload")
    assert {r["pid"] for r in recycled} == first
    f.proc.send_signal(signal.SIGTTIN)
    f.wait_for("start", worker=3)
    f.proc.send_signal(signal.SIGTTOU)
    f.wait_for("exit", worker=3)
    assert f.stop() == 0


def test_cgroup_budget_is_the_default(fleet, tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.high").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    f = fleet(FAST, ["--task", "0.2"], env={"EBB_CGROUP_DIR": str(tmp_path)})
    cfg = f.wait_for("config")[0]
    assert cfg["total_limit"] == 1073741824 // 10 * 9
    assert "(from the cgroup)" in cfg["message"]
    f.stop()


@pytest.fixture
def redis_url(tmp_path):
    """A private redis-server on a free loopback port, stopped after the test."""
    import socket
    if not os.path.exists("/usr/bin/redis-server"):
        pytest.skip("redis-server not installed (scripts/install-deps installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def assert_exactly_once(f, r, count, min_recycles, timeout):
    """Waits (bounded) for `count` ids 0..count-1 in the Redis list "done",
    stops the fleet, and checks each ran exactly once across at least
    min_recycles hard-limit recycles, every one a warm shutdown (exit 0, no KILL)."""
    deadline = time.monotonic() + timeout
    while r.llen("done") < count and time.monotonic() < deadline and f.proc.poll() is None:
        time.sleep(0.2)
    done = [int(x) for x in r.lrange("done", 0, -1)]
    code = f.stop(timeout=60)
    recycles = f.of("recycle", reason="hard limit")
    assert len(recycles) >= min_recycles, "".join(f.raw[-30:])
    assert sorted(done) == list(range(count)), (len(done), len(set(done)))  # every one, once
    for rec in recycles:
        ex = f.of("exit", pid=rec["pid"])
        assert ex and ex[0].get("status") == 0 and not ex[0].get("killed"), ex
    assert code == 0


def celery_task(redis_url):
    """The `work` task of tests/integration/apps/celery_app.py, bound to this
    test's Redis: imported afresh, since the app reads its broker URL at import."""
    sys.path.insert(0, APPS)
    os.environ["EBB_TEST_REDIS"] = redis_url
    sys.modules.pop("celery_app", None)
    try:
        from celery_app import work
    finally:
        sys.path.remove(APPS)
        del os.environ["EBB_TEST_REDIS"]
    return work


def test_celery_tasks_run_exactly_once_across_recycles(fleet, redis_url):
    """Seed 002: tasks with large kwargs grow the workers past the hard limit."""
    import redis
    work = celery_task(redis_url)
    tasks = 400
    payload = "x" * 400_000  # ~0.4 MB kept per task
    for i in range(tasks):
        work.delay(i, payload)
    # ebb.celery (python/ebb): the celery CLI with a step that makes SIGTERM
    # stop the worker between tasks (see its docstring for what plain Celery
    # 5.2 does instead: lose or repeat a task now and then).
    f = fleet(["-w", "2", "--hard-limit", "70M", "--metric", "rss", "--grace", "30s", *FAST], [],
              env={"EBB_TEST_REDIS": redis_url, "PYTHONPATH": PYTHON_DIR},
              command=[PY, "-m", "ebb.celery", "-A", "celery_app", "--workdir", APPS, "worker", "--pool=solo",
                       "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"])
    assert_exactly_once(f, redis.Redis.from_url(redis_url), tasks, min_recycles=4, timeout=180)


def test_rq_jobs_run_exactly_once_across_recycles(fleet, redis_url):
    """rq workers with large job arguments, recycled at their hard limit.

    ebb.rq.SimpleWorker (python/ebb) stops between jobs; plain RQ 1.13 drops
    a job now and then when SIGTERM lands between taking it from Redis and
    starting it (see python/ebb/rq.py).
    """
    import redis
    from rq import Queue
    r = redis.Redis.from_url(redis_url)
    q = Queue("default", connection=r)
    jobs = 400
    payload = "x" * 400_000  # ~0.4 MB kept per job (seed 002's large arguments)
    for i in range(jobs):
        q.enqueue("rq_jobs.work", i, payload)
    f = fleet(["-w", "2", "--hard-limit", "60M", "--metric", "rss", "--grace", "30s", *FAST], [],
              env={"EBB_TEST_REDIS": redis_url, "PYTHONPATH": PYTHON_DIR},
              command=[PY, "/usr/bin/rq", "worker", "--url", redis_url, "--path", APPS,
                       "--worker-class", "ebb.rq.SimpleWorker", "--quiet", "default"])
    assert_exactly_once(f, r, jobs, min_recycles=3, timeout=120)
    assert not q.failed_job_registry.get_job_ids(), "no job failed"


def test_ebb_rq_worker_stops_promptly_when_idle(fleet, redis_url):
    """An idle ebb.rq worker (blocked waiting for jobs) leaves within about a second of SIGTERM."""
    f = fleet(["--grace", "10s", *FAST], [], env={"PYTHONPATH": PYTHON_DIR},
              command=[PY, "/usr/bin/rq", "worker", "--url", redis_url, "--worker-class", "ebb.rq.Worker",
                       "--quiet", "default"])
    f.wait_for("start")
    time.sleep(1.5)
    t0 = time.monotonic()
    assert f.stop() == 0
    assert time.monotonic() - t0 < 5
    assert not f.of("kill")


def test_status_socket_metrics_and_ps_fleet(fleet, ebb_bin, tmp_path):
    sock = tmp_path / "fleet.sock"
    f = fleet(["-w", "2", "--hard-limit", "45M", "--grace", "5s", "--status-socket", str(sock),
               "--metrics", "127.0.0.1:0", *FAST], ["--leak", "2", "--task", "0.1"])
    address = f.wait_for("metrics")[0]["address"]
    f.wait_for("exit", reason="hard limit", timeout=30)
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    # ebb ps --fleet: the JSON agrees with what the log said, the table shows it.
    status = json.loads(subprocess.run([ebb_bin, "ps", "--fleet", str(sock), "--json"], capture_output=True,
                                       text=True, check=True, timeout=10).stdout)
    assert status["pid"] == f.proc.pid and status["metric"] == "pss"
    assert status["recycles"]["hard limit"] >= 1
    live = {w["pid"] for w in status["workers"]}
    assert len(live) >= 2 and any(w["mem"] > 0 for w in status["workers"])  # a new one may not be sampled yet
    table = subprocess.run([ebb_bin, "ps", "--fleet", str(sock)], capture_output=True, text=True, check=True,
                           timeout=10).stdout
    assert "WORKER" in table and "PSS" in table and "fleet" in table
    # Prometheus text format: every sample line is "name{labels} value".
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-z_]+)(\{[^}]*\})? (\S+)', line)
        assert m, line
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    assert samples['ebb_workers{state="running"}'] >= 2
    assert samples['ebb_recycles_total{reason="hard limit"}'] >= 1
    assert samples['ebb_fleet_memory_bytes{metric="pss"}'] > 0
    assert f.stop() == 0
    assert not sock.exists(), "the socket is removed at exit"
    r = subprocess.run([ebb_bin, "ps", "--fleet", str(sock)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "--fleet" in r.stderr


def test_endpoints_that_cannot_be_set_up_start_nothing(ebb_bin, tmp_path):
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("keep me")
    marker = tmp_path / "started"
    for extra in (["--status-socket", str(not_a_socket)], ["--metrics", "256.0.0.1:9"]):
        r = subprocess.run([ebb_bin, "run", *extra, "--", PY, "-c", f"open({str(marker)!r}, 'w')"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r.stderr
        assert not marker.exists()
    assert not_a_socket.read_text() == "keep me"


@pytest.mark.parametrize("args,code,message", [
    (["--bogus", "--", PY, "-c", "pass"], 2, "--bogus"),
    (["--hard-limit", "lots", "--", PY, "-c", "pass"], 2, "bad size"),
    (["--grace", "soon", "--", PY, "-c", "pass"], 2, "bad duration"),
    (["--stop-signal", "SIGNOPE", "--", PY, "-c", "pass"], 2, "unknown signal"),
    (["--soft-limit", "2G", "--hard-limit", "1G", "--", PY, "-c", "pass"], 2, "below --hard-limit"),
    ([], 2, "missing command"),
    (["--", "/no/such/worker"], 127, "command not found"),
    (["--", "no-such-worker-command"], 127, "command not found"),
])
def test_bad_input_is_one_line_and_starts_nothing(ebb_bin, tmp_path, args, code, message):
    marker = tmp_path / "started"
    r = subprocess.run([ebb_bin, "run", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # CLI11 adds "Run with --help" on usage errors
    assert not marker.exists()

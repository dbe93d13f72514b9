"""`ebb run --children`: the workers are the children of a master ebb did not fork.

ebb recycles one child at a time with a signal the child finishes its work
on (src/supervisor/master.h); the master forks the replacement. Each test
drives a real master: Celery prefork with a private redis-server (every
task counted, started and done, per task id), gunicorn sync and gthread
under wrk (every response counted). Loads are bounded in count and time.
"""
import datetime
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from test_run import APPS, FAST, PY, PYTHON_DIR, fleet, redis_url  # noqa: F401 (fixtures)

WRK = "/usr/bin/wrk"


def parse_time(stamp):
    """Seconds since the epoch of a log line's time (2026-12-04T18:05:30.467Z)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def celery_prefork(fleet, redis_url, acks_late, options, entry="ebb.celery", tasks=400, env=None,  # noqa: F811
                   seconds=0.05, until=None):
    """Queues `tasks` tasks that keep 1.5 MB each in their pool process (`seconds` each), then
    runs a 4-process prefork worker under `ebb run --children` until every
    task is done, or `until(redis)` is true (bounded), and stops it; returns
    (fleet, started, done) with per-id counts read from Redis."""
    import redis
    r = redis.Redis.from_url(redis_url)
    env = {"EBB_TEST_REDIS": redis_url, "EBB_TEST_ACKS_LATE": "1" if acks_late else "0", "PYTHONPATH": PYTHON_DIR,
           **(env or {})}
    # The app reads its broker and acks_late at import: queue through a fresh import.
    queue = subprocess.run([PY, "-c", f"""
import sys; sys.path.insert(0, {APPS!r})
from celery_prefork_app import work
for i in range({tasks}):
    work.delay(i, "k" * 200_000, {seconds})
"""], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert queue.returncode == 0, queue.stderr
    f = fleet(["--children", "--metric", "rss", "--grace", "30s", *FAST, *options], [], env=env,
              command=[PY, "-m", entry, "-A", "celery_prefork_app", "--workdir", APPS, "worker", "--pool", "prefork",
                       "--concurrency", "4", "-l", "warning"])
    deadline = time.monotonic() + 180
    until = until or (lambda r: r.hlen("done") >= tasks)
    while not until(r) and time.monotonic() < deadline and f.proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # a task counted twice would show by now
    assert f.stop(timeout=60) == 0, "".join(f.raw[-30:])
    started = {int(k): int(v) for k, v in r.hgetall("started").items()}
    done = {int(k): int(v) for k, v in r.hgetall("done").items()}
    return f, started, done


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks_late"])
def test_celery_prefork_children_recycled_with_every_task_exactly_once(fleet, redis_url, acks_late):  # noqa: F811
    """Seed 000's setup: ebb recycles pool processes at their hard limit, each
    finishes its task first (ebb.celery's SIGINT), and no task is lost or run twice."""
    tasks = 400
    f, started, done = celery_prefork(fleet, redis_url, acks_late, ["--hard-limit", "90M", "--max-recycling", "2"],
                                      tasks=tasks)
    log = "".join(f.raw)
    recycles = f.of("recycle", reason="hard limit")
    lost = [i for i in range(tasks) if done.get(i, 0) == 0]
    twice = [i for i in range(tasks) if started.get(i, 0) != 1 or done.get(i, 0) > 1]
    print(f"acks_late={acks_late}: {len(done)}/{tasks} done, {len(lost)} lost, {len(twice)} repeated, "
          f"{len(recycles)} recycles")
    # Two at a time: a recycled pool process can take seconds to exit (the jobs
    # already sent to it run first), and one at a time made 3 in a CI run.
    assert len(recycles) >= 5, log[-3000:]
    assert all(r["message"].count("SIGINT") == 1 for r in recycles)
    assert not lost and not twice, (lost, twice)
    assert "WorkerLostError" not in log and "exited with 'signal" not in log, log[-3000:]
    assert not f.of("kill"), "every recycled pool process finished within the grace"
    cfg = f.of("config")[0]
    assert cfg["master"] == "celery (python3 -m ebb.celery)" and cfg["stop_signal"] == "SIGINT"


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks_late"])
def test_celery_master_restarted_above_its_hard_limit_with_every_task_exactly_once(fleet, redis_url, acks_late):  # noqa: F811
    """A Celery master that keeps 1 MB per task it receives (seed 002's growth),
    with --master-hard-limit: ebb starts a new master, the old one (SIGUSR2,
    ebb.celery) stops consuming, runs what it took and shuts down warmly."""
    import redis
    tasks = 400
    f, started, done = celery_prefork(fleet, redis_url, acks_late, ["--master-hard-limit", "110M"], tasks=tasks,
                                      env={"EBB_TEST_MASTER_KEEP": "1000000", "EBB_TEST_KEEP": "0"}, seconds=0.2)
    log = "".join(f.raw)
    restarts = [r for r in f.of("restart") if r.get("master")]  # the decisions
    drained = log.count("ebb.celery: drained in")  # restarts and the last stop
    # Drained after a takeover (a new master stopped with ebb is drained too, reason "shutdown").
    old_exits = [e for e in f.of("exit", reason="hard limit") if e["message"].startswith("old master")]
    lost = [i for i in range(tasks) if done.get(i, 0) == 0]
    twice = [i for i in range(tasks) if started.get(i, 0) != 1 or done.get(i, 0) > 1]
    print(f"acks_late={acks_late}: {len(done)}/{tasks} done, {len(lost)} lost, {len(twice)} repeated, "
          f"{len(restarts)} master restarts, {drained} drained, {len(old_exits)} old masters exited")
    assert len(restarts) >= 2, log[-3000:]
    assert all("SIGUSR2" in r["message"] for r in restarts)
    assert drained >= len(old_exits) >= 2, log[-3000:]
    assert redis.Redis.from_url(redis_url).get("received_while_draining") is None, "a draining master took a task"
    ready = [r for r in f.of("restart") if "successor" in r]  # the new master ran its pool before the drain
    assert len(ready) == len(old_exits), restarts
    assert all("exited with status 0" in e["message"] for e in old_exits), old_exits
    assert not lost and not twice, (lost, twice)
    assert "WorkerLostError" not in log and not f.of("kill"), log[-3000:]
    assert len(f.of("start")) == len(restarts) + 1, "one new master per restart"


def test_celery_master_restart_waits_for_its_successors_pool(fleet, redis_url, ebb_bin, tmp_path):  # noqa: F811
    """Every master after the first takes 8 s to import (a slow deploy): the
    old one is drained only once its successor runs its pool, so tasks keep
    completing while the new master starts. Drained at once, the old master
    would finish its prefetched tasks within a second and leave none running
    for the rest of those 8 s. Meanwhile ps --fleet shows both masters."""
    import redis
    tasks, slow = 500, 8
    sock = tmp_path / "fleet.sock"
    states = set()

    def watch(r):
        p = subprocess.run([ebb_bin, "ps", "--fleet", str(sock), "--json"], capture_output=True, text=True, timeout=10)
        if p.returncode == 0:
            states.add(tuple(sorted(w["state"] for w in json.loads(p.stdout)["workers"] if "master" in w["state"])))
        return r.hlen("done") >= tasks

    f, started, done = celery_prefork(fleet, redis_url, False, ["--master-hard-limit", "110M", "--status-socket",
                                                                str(sock)], tasks=tasks,
                                      env={"EBB_TEST_MASTER_KEEP": "1000000", "EBB_TEST_KEEP": "0",
                                           "EBB_TEST_SLOW_REDEPLOY": f"{tmp_path / 'deployed'}:{slow}"},
                                      seconds=0.2, until=watch)
    log = "".join(f.raw)
    assert ("master", "new master") in states, states
    old_exits = [e for e in f.of("exit", reason="hard limit") if e["message"].startswith("old master")]
    times = sorted(float(t) for t in redis.Redis.from_url(redis_url).lrange("done_at", 0, -1))
    gap = max(b - a for a, b in zip(times, times[1:]))
    print(f"{len(done)}/{tasks} done, {len(old_exits)} takeovers, longest gap between completions {gap:.2f} s")
    assert old_exits, log[-3000:]
    assert gap < slow / 2, f"no task completed for {gap:.1f} s: the old master stopped before its successor ran"
    assert sorted(done) == list(range(tasks)) and set(done.values()) == {1} and set(started.values()) == {1}


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks_late"])
def test_celery_master_stopped_with_ebb_runs_every_task_it_took(fleet, redis_url, acks_late):  # noqa: F811
    """ebb stops mid-queue: the ebb.celery master is drained, so it runs every
    task it received, the prefetched ones too, before it exits (a plain warm
    shutdown would hand those back and can hang with a job half written to a
    pool process); what it never received stays queued; nothing runs twice."""
    import redis
    tasks = 300
    f, started, done = celery_prefork(fleet, redis_url, acks_late, [], tasks=tasks, seconds=0.2,
                                      until=lambda r: r.hlen("done") >= 20)
    r = redis.Redis.from_url(redis_url)
    received, queued = int(r.get("received") or 0), r.llen("celery")
    log = "".join(f.raw)
    print(f"acks_late={acks_late}: {received} received, {len(done)} done, {queued} still queued")
    assert "ebb.celery: drained in" in log, log[-3000:]
    assert received == len(done) > 20, "every task the master took ran before it exited"
    assert set(done.values()) == {1} and started == done
    assert queued == tasks - len(done), "the rest waits in the broker"
    assert "WorkerLostError" not in log and not f.of("kill"), log[-3000:]


def test_celery_master_whose_successor_fails_keeps_running(fleet, redis_url, tmp_path):  # noqa: F811
    """The new master fails at import (a broken deploy): the old one is never
    drained, keeps consuming, and runs every task; one error line, a wait."""
    tasks = 200
    f, started, done = celery_prefork(fleet, redis_url, False, ["--master-hard-limit", "110M"], tasks=tasks,
                                      env={"EBB_TEST_MASTER_KEEP": "1000000", "EBB_TEST_KEEP": "0",
                                           "EBB_TEST_BROKEN_REDEPLOY": str(tmp_path / "deployed")}, seconds=0.1)
    log = "".join(f.raw)
    errors = [e for e in f.of("error") if "new master exited before its pool ran" in e["message"]]
    print(f"{len(done)}/{tasks} done, {len(errors)} failed handovers")
    assert len(errors) == 1 and "next try in 60s" in errors[0]["message"], log[-3000:]
    assert "draining" not in log[:log.index('"event":"shutdown"')], "the old master was drained before ebb stopped"
    assert not [e for e in f.of("exit") if e["message"].startswith("old master")]
    assert sorted(done) == list(range(tasks)) and set(done.values()) == {1} and set(started.values()) == {1}


def test_plain_celery_children_are_trimmed_never_recycled(fleet, redis_url):  # noqa: F811
    """Plain `celery`: SIGTERM would lose the task, so ebb refuses to recycle
    its pool processes, says so at start and once per child, and loses nothing."""
    tasks = 120
    f, started, done = celery_prefork(fleet, redis_url, False, ["--hard-limit", "70M"], entry="celery", tasks=tasks)
    cfg = f.of("config")[0]
    assert cfg["recycle_children"] is False
    assert "never recycled" in cfg["message"] and "python3 -m ebb.celery" in cfg["message"]
    assert not f.of("recycle")
    refused = f.of("refuse")
    assert refused and len({r["pid"] for r in refused}) == len(refused), "one line per child"
    assert sorted(done) == list(range(tasks)) and set(done.values()) == {1}


def test_unknown_master_needs_a_named_stop_signal(fleet, tmp_path):  # noqa: F811
    """A master ebb does not know: no recycling by default; with --stop-signal, that signal."""
    master = tmp_path / "master.py"
    master.write_text("""
import os, signal, sys, time
kept = []
def child():
    signal.signal(signal.SIGUSR2, lambda *a: sys.exit(0))  # its graceful stop
    while True:
        kept.append(bytearray(4 << 20)); time.sleep(0.05)
children = set()
signal.signal(signal.SIGTERM, lambda *a: [os.kill(p, signal.SIGKILL) for p in children] and sys.exit(0))
while True:
    while len(children) < 2:
        pid = os.fork()
        if pid == 0:
            child()
        children.add(pid)
    pid, _ = os.wait()
    children.discard(pid)
""")
    f = fleet(["--children", "--hard-limit", "60M", "--metric", "rss", *FAST], [], command=[PY, str(master)])
    f.wait_for("refuse", count=2)
    assert "name it with --stop-signal" in f.of("config")[0]["message"]
    assert not f.of("recycle")
    assert f.stop() == 0
    f = fleet(["--children", "--hard-limit", "60M", "--metric", "rss", "--stop-signal", "USR2", *FAST], [],
              command=[PY, str(master)])
    f.wait_for("recycle", count=3)
    assert not f.of("refuse") and not f.of("kill")
    assert all("SIGUSR2" in r["message"] for r in f.of("recycle"))
    assert f.stop() == 0


def test_children_a_dead_master_leaves_are_stopped(fleet, tmp_path):  # noqa: F811
    """A master that dies without stopping its children (killed, or exiting at
    once on SIGTERM): ebb, their parent now, stops each with the stop signal,
    restarts the master when it crashed, and a shutdown ends within the grace
    instead of waiting for children nobody stops."""
    master = tmp_path / "master.py"
    master.write_text("""
import os, signal, sys, time
def child():
    signal.signal(signal.SIGUSR2, lambda *a: sys.exit(0))  # its graceful stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # not this one: the test sees which came
    while True:
        time.sleep(0.05)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))  # leaves its children behind
for _ in range(2):
    if os.fork() == 0:
        child()
while True:
    time.sleep(1)
""")
    f = fleet(["--children", "--stop-signal", "USR2", "--grace", "20s", *FAST], [], command=[PY, str(master)])
    first = f.wait_for("adopt", count=2)
    old = [e["pid"] for e in first]
    master_pid = f.of("start")[0]["pid"]
    os.kill(master_pid, signal.SIGKILL)
    orphans = f.wait_for("orphan", count=2, reason="master exited")
    assert sorted(e["pid"] for e in orphans) == sorted(old)
    f.wait_for("adopt", count=4)  # the restarted master's children
    for pid in old:
        f.wait_for("exit", pid=pid)
    started = time.monotonic()
    assert f.stop(timeout=15) == 0, "".join(f.raw)
    assert time.monotonic() - started < 10, "".join(f.raw)
    assert len(f.of("orphan", reason="shutdown")) == 2, "".join(f.raw)
    assert not f.of("kill"), "".join(f.raw)


def gunicorn_port(f, timeout=30):
    """The port a gunicorn master under the fleet `f` bound (it logs it)."""
    deadline = time.monotonic() + timeout
    port = None
    while port is None and time.monotonic() < deadline:
        m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", "".join(f.raw))
        port = m and int(m.group(1))
        time.sleep(0.1)
    assert port, "".join(f.raw)
    return port


@pytest.mark.parametrize("worker_class", ["sync", "ebb.gthread.ThreadWorker"])
def test_gunicorn_children_recycled_without_failed_requests(fleet, worker_class):  # noqa: F811
    """gunicorn's workers finish their requests on SIGTERM: under wrk (4
    connections, 10 s, keep-alive), leaking workers are recycled at least 5
    times with no socket error and no non-2xx response. Threaded workers
    are ebb.gthread's, which also answer what comes on their keep-alive
    connections while they stop (plain gthread resets them: python/ebb/gthread.py)."""
    if not os.path.exists(WRK):
        pytest.skip("wrk not installed (scripts/install-deps installs it)")
    threads = ["--threads", "4"] if "gthread" in worker_class else []
    f = fleet(["--children", "--hard-limit", "45M", "--metric", "rss", "--grace", "20s", *FAST], [],
              env={"PYTHONPATH": PYTHON_DIR},
              command=[PY, "-m", "gunicorn", "--workers", "2", "--worker-class", worker_class, *threads,
                       "--bind", "127.0.0.1:0", "--chdir", APPS, "--graceful-timeout", "20", "leaky_app:app"])
    port = gunicorn_port(f)
    f.wait_for("adopt", count=2)
    wrk = subprocess.run([WRK, "-t", "2", "-c", "4", "-d", "10s", "--timeout", "20s", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=60)
    assert wrk.returncode == 0, wrk.stderr
    out = wrk.stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    assert total >= 200, out
    assert "Socket errors" not in out, out  # connect, read, write or timeout errors
    assert "Non-2xx or 3xx responses" not in out, out
    recycled = f.of("recycle", reason="hard limit")
    assert len(recycled) >= 5, "".join(f.raw)
    for r in recycled:
        assert r["mem"] > 40 << 20 and "SIGTERM" in r["message"]
    # gunicorn replaced the recycled workers, and ebb found the new ones.
    assert len(f.of("adopt")) >= 2 + len(recycled) - 2
    assert not f.of("kill"), "recycled workers finish their requests within the grace"
    assert f.of("config")[0]["master"] == "gunicorn"
    assert f.stop() == 0
    print(f"{worker_class}: wrk {total} requests, {len(recycled)} recycles")


def test_gunicorn_master_handed_over_above_its_hard_limit(fleet, ebb_bin, tmp_path):  # noqa: F811
    """A gunicorn master that keeps 8 MB each time it forks a worker (its
    workers leak and are recycled at 45 MB): above --master-hard-limit, ebb
    sends it SIGUSR2, waits for the new master's workers, stops the old one
    and follows the new one. Under wrk: no socket error, no non-2xx."""
    if not os.path.exists(WRK):
        pytest.skip("wrk not installed (scripts/install-deps installs it)")
    sock = tmp_path / "fleet.sock"
    f = fleet(["--children", "--hard-limit", "45M", "--master-hard-limit", "80M", "--metric", "rss", "--grace", "20s",
               "--status-socket", str(sock), "--metrics", "127.0.0.1:0", *FAST], [], env={"PYTHONPATH": PYTHON_DIR},
              command=["/usr/bin/gunicorn", "--workers", "2", "--bind", "127.0.0.1:0", "--chdir", APPS,
                       "-c", os.path.join(APPS, "gunicorn_leaky_master.py"), "--graceful-timeout", "20",
                       "leaky_app:app"])
    port = gunicorn_port(f)
    wrk = subprocess.run([WRK, "-t", "2", "-c", "4", "-d", "12s", "--timeout", "20s", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=60)
    assert wrk.returncode == 0, wrk.stderr
    out = wrk.stdout
    assert "Socket errors" not in out and "Non-2xx or 3xx responses" not in out, out
    restarts = f.of("restart", reason="hard limit")
    took_over = [e for e in f.of("exit") if "successor" in e]
    assert len(restarts) >= 2 and len(took_over) >= 2, "".join(f.raw)[-4000:]
    assert all("SIGUSR2" in r["message"] and r["mem"] > 80 << 20 for r in restarts)
    # Above its limit the master is trimmed first, like a worker, and named as the master.
    assert any(t["message"].startswith("master [pid") for t in f.of("trim", reason="hard limit")), f.of("trim")
    # ebb follows the new master: ps --fleet and the metrics show it, and it is the one stopped at the end.
    last = took_over[-1]["successor"]
    status = json.loads(subprocess.run([ebb_bin, "ps", "--fleet", str(sock), "--json"], capture_output=True,
                                       text=True, check=True, timeout=10).stdout)
    masters = [w for w in status["workers"] if w["state"] == "master"]
    assert len(masters) == 1 and masters[0]["mem"] > 0 and masters[0]["hard_limit"] == 80 << 20, status
    assert status["master_restarts"] == len(restarts)
    address = f.of("metrics")[0]["address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert f"ebb_master_restarts_total {len(restarts)}" in text, text
    table = subprocess.run([ebb_bin, "ps", "--fleet", str(sock)], capture_output=True, text=True, check=True,
                           timeout=10).stdout
    assert "master" in table, table
    assert f.stop() == 0
    assert f.of("exit", pid=last), "".join(f.raw)[-2000:]
    assert not f.of("kill")
    total = re.search(r"(\d+) requests in", out).group(1)
    print(f"wrk: {total} requests, {len(restarts)} master handovers")


def test_gunicorn_handover_that_fails_keeps_the_old_master(fleet, ebb_bin, tmp_path):  # noqa: F811
    """The new master's workers fork, then fail to boot 1.5 s later (before
    --min-uptime 3s), and the new master exits: ebb keeps the old master,
    which goes on serving, says why, waits before trying again, and leaves
    no process behind."""
    sock = tmp_path / "fleet.sock"
    f = fleet(["--children", "--master-hard-limit", "80M", "--metric", "rss", "--grace", "10s", "--status-socket",
               str(sock), "--interval", "0.2s", "--min-uptime", "3s"], [], env={"PYTHONPATH": PYTHON_DIR},
              command=["/usr/bin/gunicorn", "--workers", "2", "--bind", "127.0.0.1:0", "--chdir", APPS,
                       "-c", os.path.join(APPS, "gunicorn_failing_successor.py"), "leaky_app:app"])
    port = gunicorn_port(f)
    first = f.of("start")[0]["pid"]
    error = f.wait_for("error", timeout=60)[0]
    assert "exited before it took over" in error["message"] and "next try in 60s" in error["message"], error
    assert error["pid"] == first and error["successor"] > 0
    print(error["message"])
    assert not [e for e in f.of("exit") if "successor" in e] and not f.of("kill")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        assert r.status == 200
    status = json.loads(subprocess.run([ebb_bin, "ps", "--fleet", str(sock), "--json"], capture_output=True,
                                       text=True, check=True, timeout=10).stdout)
    assert [w["pid"] for w in status["workers"] if w["state"] == "master"] == [first], status
    ours = {first, error["successor"], *[w["pid"] for w in status["workers"]]}
    assert f.stop() == 0
    left = [p for p in ours if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not left, left


def test_gunicorn_handover_timeout_keeps_the_old_master(fleet, ebb_bin, tmp_path):  # noqa: F811
    """The new master hangs before it forks a worker: after --handover-timeout
    (4 s here) plus --min-uptime, ebb gives up on it, stops it (SIGKILL after
    the grace: it ignores SIGTERM while stuck), keeps the old master serving,
    and waits the timeout before the next try."""
    f = fleet(["--children", "--master-hard-limit", "80M", "--metric", "rss", "--grace", "3s", "--interval", "0.2s",
               "--min-uptime", "1s", "--handover-timeout", "4s"], [], env={"PYTHONPATH": PYTHON_DIR},
              command=["/usr/bin/gunicorn", "--workers", "2", "--bind", "127.0.0.1:0", "--chdir", APPS,
                       "-c", os.path.join(APPS, "gunicorn_stuck_successor.py"), "leaky_app:app"])
    port = gunicorn_port(f)
    first = f.of("start")[0]["pid"]
    restart = f.wait_for("restart", timeout=30)[0]
    error = f.wait_for("error", timeout=30)[0]
    waited = (parse_time(error["time"]) - parse_time(restart["time"]))
    print(f"{error['message']} ({waited:.1f} s after SIGUSR2)")
    assert "did not run" in error["message"] or "no new master ran its workers" in error["message"], error
    assert "within 5.0s" in error["message"] and "next try in 4.0s" in error["message"], error
    assert 4.5 <= waited < 15, waited
    assert error["pid"] == first and error["successor"] > 0
    stuck = error["successor"]
    kill = f.wait_for("kill", timeout=20)[0]
    assert kill["pid"] == stuck, kill
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        assert r.status == 200
    assert f.of("start")[0]["pid"] == first and not [e for e in f.of("exit") if "successor" in e]
    assert f.stop() == 0
    assert not os.path.exists(f"/proc/{stuck}") or "Z" in open(f"/proc/{stuck}/stat").read().split()[2]


def test_gunicorn_old_master_killed_during_a_handover(fleet, ebb_bin, tmp_path):  # noqa: F811
    """The old master dies (SIGKILL) between SIGUSR2 and the takeover: ebb,
    a subreaper, adopts the new master it forked, which goes on serving, and
    stops it at the end."""
    if not os.path.exists(WRK):
        pytest.skip("wrk not installed (scripts/install-deps installs it)")
    sock = tmp_path / "fleet.sock"
    f = fleet(["--children", "--hard-limit", "45M", "--master-hard-limit", "80M", "--metric", "rss", "--grace", "20s",
               "--status-socket", str(sock), "--interval", "0.2s", "--min-uptime", "3s"], [],
              env={"PYTHONPATH": PYTHON_DIR},
              command=["/usr/bin/gunicorn", "--workers", "2", "--bind", "127.0.0.1:0", "--chdir", APPS,
                       "-c", os.path.join(APPS, "gunicorn_leaky_master.py"), "--graceful-timeout", "20",
                       "leaky_app:app"])
    port = gunicorn_port(f)
    load = subprocess.Popen([WRK, "-t", "1", "-c", "2", "-d", "30s", f"http://127.0.0.1:{port}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        restart = f.wait_for("restart", timeout=40, reason="hard limit")[0]
        # After the new master's fork (at once on SIGUSR2), before its takeover
        # (its workers must run for --min-uptime 3s first).
        time.sleep(1.0)
        assert not [e for e in f.of("exit") if "successor" in e], "took over within 1 s"
        os.kill(restart["pid"], signal.SIGKILL)
        took_over = f.wait_for("exit", timeout=30, pid=restart["pid"])[0]
    finally:
        load.kill()
        load.wait()
    assert took_over.get("successor", 0) > 0 and "killed by SIGKILL" in took_over["message"], took_over
    new = took_over["successor"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        assert r.status == 200
    status = json.loads(subprocess.run([ebb_bin, "ps", "--fleet", str(sock), "--json"], capture_output=True,
                                       text=True, check=True, timeout=10).stdout)
    assert [w["pid"] for w in status["workers"] if w["state"] == "master"] == [new], status
    assert f.stop() == 0
    assert f.of("exit", pid=new), "".join(f.raw)[-2000:]
    assert not os.path.exists(f"/proc/{new}") or "Z" in open(f"/proc/{new}/stat").read().split()[2]


def test_master_hard_limit_refused_for_plain_celery_and_without_children(ebb_bin):
    """--master-hard-limit: one clear line and status 2 before anything starts
    (plain `celery`: its warm shutdown can hang; ebb.celery drains first)."""
    for command, expect in [(["--children", "--", PY, "-m", "celery", "-A", "app", "worker"],
                             "start the worker as `python3 -m ebb.celery"),
                            (["--children", "--", PY, "-m", "ebb.celery", "-A", "app", "worker", "--pool", "solo"],
                             "the solo pool has none"),
                            (["--", PY, "-c", "pass"], "needs --children")]:
        p = subprocess.run([ebb_bin, "run", "--master-hard-limit", "100M", *command], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2 and expect in p.stderr, (command, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr

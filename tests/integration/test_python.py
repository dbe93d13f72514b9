"""The ebb Python package (python/ebb): stats, trim, isolate."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PY = "/usr/bin/python3"
PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")
sys.path.insert(0, PYTHON_DIR)
import ebb  # noqa: E402
from test_run import redis_url  # noqa: E402,F401 - a private redis-server fixture


def run(code, env):
    e = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
    e.update(env, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, env=e, timeout=60)


def test_stats_and_trim_under_libebb(ebb_lib):
    r = run("import ebb\n"
            "assert ebb.loaded()\n"
            "x = [str(i) * 20 for i in range(300000)]\n"
            "s = ebb.stats()\n"
            "assert s['live_bytes'] > 20 << 20, s\n"
            "del x\n"
            "released = ebb.trim()\n"
            "assert released > 10 << 20, released\n"
            "print('ok', s['segments'], released)\n",
            {"LD_PRELOAD": ebb_lib, "PYTHONMALLOC": "malloc", "EBB_PURGE_DELAY_MS": "600000",
             "EBB_EMPTY_DELAY_MS": "600000"})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def test_without_libebb_stats_says_so_and_trim_uses_glibc():
    r = run("import ebb\n"
            "assert not ebb.loaded()\n"
            "assert ebb.trim() is None\n"
            "try:\n"
            "    ebb.stats()\n"
            "except ebb.NotLoaded as e:\n"
            "    print(e)\n", {})
    assert r.returncode == 0, r.stderr
    assert "libebb is not loaded" in r.stdout and "LD_PRELOAD" in r.stdout


def big_sum(n):
    data = [str(i) * 10 for i in range(n)]  # ~n * 70 bytes, in the child only
    return sum(len(s) for s in data), os.getpid()


class Boom(Exception):
    pass


def raises():
    raise Boom("from the child")


def test_isolate_returns_the_result_computed_in_a_child():
    total, pid = ebb.isolate(big_sum, 200000)
    assert total == sum(len(str(i) * 10) for i in range(200000))
    assert pid != os.getpid()


def test_isolate_raises_the_childs_exception():
    with pytest.raises(Boom, match="from the child") as info:
        ebb.isolate(raises)
    assert any("in the child of ebb.isolate()" in n for n in getattr(info.value, "__notes__", []))


def test_isolate_times_out_and_kills_the_child():
    import time
    with pytest.raises(TimeoutError):
        ebb.isolate(time.sleep, 30, timeout=0.5)


def test_isolate_reports_a_child_that_dies():
    with pytest.raises(ChildProcessError):
        ebb.isolate(os._exit, 3)


def test_isolate_keeps_the_parent_small():
    r = run("import ebb, resource\n"
            "def work():\n"
            "    x = [str(i) * 30 for i in range(1000000)]\n"
            "    return len(x)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "assert ebb.isolate(work) == 1000000\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(before, after)\n"
            "assert after - before < 10000, (before, after)\n", {})
    assert r.returncode == 0, r.stdout + r.stderr


def test_gunicorn_hooks_freeze_the_preloaded_app_and_reenable_gc_in_workers(tmp_path):
    """A real gunicorn with ebb.gunicorn's hooks: the workers see a frozen heap and a running collector."""
    import json
    import re
    import time
    import urllib.request
    apps = str(Path(__file__).resolve().parent / "apps")
    e = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
    e["PYTHONPATH"] = PYTHON_DIR
    log = tmp_path / "gunicorn.log"
    proc = subprocess.Popen([PY, "-m", "gunicorn", "-c", str(Path(apps) / "gunicorn_ebb_conf.py"), "--workers", "2",
                             "--bind", "127.0.0.1:0", "--chdir", apps, "gc_app:app"],
                            env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        port = None
        while time.monotonic() < deadline:
            text = log.read_text()
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            if m and text.count("Booting worker") == 2:
                port = int(m.group(1))
                break
            assert proc.poll() is None, text
            time.sleep(0.1)
        assert port, log.read_text()
        seen = {}
        for _ in range(40):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                state = json.load(r)
            seen[state["pid"]] = state
        for state in seen.values():
            assert state["enabled"] is True, state  # post_fork turned it back on
            assert state["frozen"] > 10_000, state  # when_ready froze the preloaded app (0 without it)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze_before_fork", "plain"])
def test_celery_freeze_before_fork_in_a_real_prefork_pool(tmp_path, redis_url, freeze):  # noqa: F811
    """Celery's prefork pool (2 processes) with and without ebb.celery.freeze_before_fork():
    with it, every pool process runs its collector over a frozen heap; without it nothing is frozen."""
    import json
    import time
    import redis
    url = redis_url
    r = redis.Redis.from_url(url)
    apps = str(Path(__file__).resolve().parent / "apps")
    e = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
    e.update(PYTHONPATH=f"{apps}:{PYTHON_DIR}", EBB_TEST_REDIS=url, EBB_TEST_FREEZE="1" if freeze else "0")
    log = tmp_path / "celery.log"
    worker = subprocess.Popen([PY, "-m", "celery", "-A", "celery_freeze_app", "worker", "-P", "prefork", "-c", "2",
                               "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
                              env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        code = (f"import sys; sys.path.insert(0, {apps!r}); import celery_freeze_app as a\n"
                "for _ in range(40): a.report.delay()\n")
        subprocess.run([PY, "-c", code], env=e, check=True, timeout=60)
        deadline = time.monotonic() + 60
        while r.llen("report") < 40 and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.1)
        reports = [json.loads(x) for x in r.lrange("report", 0, -1)]
        assert len(reports) == 40, log.read_text()
        assert all(x["gc"] for x in reports), reports  # the collector runs in every pool process
        frozen = {x["pid"]: x["frozen"] for x in reports}
        if freeze:
            assert all(n > 10_000 for n in frozen.values()), frozen  # Celery and the app, loaded in the parent
        else:
            assert all(n == 0 for n in frozen.values()), frozen
    finally:
        worker.terminate()
        worker.wait(timeout=30)

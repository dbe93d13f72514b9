"""A real gunicorn (2 sync workers, Flask app) running with libebb preloaded."""
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

PYTHON = "/usr/bin/python3"
APPS = Path(__file__).parent / "apps"
WORKERS = 2
START_TIMEOUT = 30  # seconds for gunicorn to listen with all workers booted
STOP_TIMEOUT = 30  # seconds for a graceful SIGTERM shutdown
BLOB_SIZE = 1 << 20


def maps_contain(pid, path):
    """True if /proc/<pid>/maps has a mapping of the file at path."""
    with open(f"/proc/{pid}/maps") as f:
        return any(line.split()[-1] == path for line in f if len(line.split()) == 6)


class Gunicorn:
    def __init__(self, env, log):
        self.log = log
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "--workers", str(WORKERS), "--worker-class", "sync",
             "--bind", "127.0.0.1:0", "--chdir", str(APPS), "--timeout", "30",
             "--graceful-timeout", "10", "flask_app:app"],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self._wait_ready()}"
        self.workers = self.worker_pids()
        assert len(self.workers) == WORKERS, self.log_text()

    def log_text(self):
        return self.log.read_text(errors="replace")

    def worker_pids(self):
        return sorted(p.pid for p in psutil.Process(self.proc.pid).children())

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gunicorn exited early:\n{self.log_text()}"
            text = self.log_text()
            port = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            if port and text.count("Booting worker with pid") == WORKERS:
                return int(port.group(1))
            time.sleep(0.1)
        pytest.fail(f"gunicorn not ready within {START_TIMEOUT} s:\n{self.log_text()}")

    def stop(self):
        """Kill whatever is left: the master and workers it may have orphaned."""
        for pid in [self.proc.pid, *self.workers]:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)


@pytest.fixture
def gunicorn(preload_env, tmp_path):
    server = Gunicorn(preload_env, tmp_path / "gunicorn.log")
    yield server
    server.stop()


def fetch(url, data=None):
    """(status, content type, worker pid, body) of one request."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as r:
            return r.status, r.headers["Content-Type"], int(r.headers["X-Worker-Pid"]), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], int(e.headers["X-Worker-Pid"]), e.read()


def items(n):
    return [{"id": i, "name": f"item-{i}", "squares": [i * i, i * i * i]} for i in range(n)]


def blob(seed):
    return bytes((seed + i) % 256 for i in range(256)) * (BLOB_SIZE // 256)


def check_request(base, i):
    """Send request number i (a mix of big and small ones), check it; return the worker pid."""
    kind = i % 6
    if kind == 0:
        status, ctype, pid, body = fetch(f"{base}/json?n=3000")
        assert (status, ctype) == (200, "application/json")
        assert json.loads(body) == items(3000)
    elif kind == 1:
        status, ctype, pid, body = fetch(f"{base}/blob?size={BLOB_SIZE}&seed={i % 256}")
        assert (status, ctype, len(body)) == (200, "application/octet-stream", BLOB_SIZE)
        assert body == blob(i % 256)
    elif kind == 2:
        data = f"{i}:".encode() * 30000
        status, ctype, pid, body = fetch(f"{base}/echo", data=data)
        assert status == 200 and body == data[::-1]
    elif kind == 3:
        status, ctype, pid, body = fetch(f"{base}/json?n={i}")
        assert status == 200 and json.loads(body) == items(i)
    elif kind == 4:
        status, ctype, pid, body = fetch(f"{base}/")
        assert (status, body) == (200, b"ok\n")
    else:
        status, ctype, pid, body = fetch(f"{base}/no-such-page")
        assert status == 404
    return pid


def send_requests(server, count, threads=4):
    """Send count requests concurrently; return the set of worker pids that served them."""
    with ThreadPoolExecutor(threads) as pool:
        return set(pool.map(lambda i: check_request(server.url, i), range(count)))


def test_every_process_maps_libebb(gunicorn, ebb_lib):
    for pid in [gunicorn.proc.pid, *gunicorn.workers]:
        assert maps_contain(pid, ebb_lib), f"{ebb_lib} not mapped in gunicorn process {pid}"


def test_responses_are_exact_under_load(gunicorn):
    served_by = send_requests(gunicorn, 300)
    assert served_by == set(gunicorn.workers), "both workers should have served requests"
    assert gunicorn.worker_pids() == gunicorn.workers, \
        f"a worker died and was replaced:\n{gunicorn.log_text()}"


def test_sigterm_exits_cleanly(gunicorn):
    send_requests(gunicorn, 60)
    gunicorn.proc.send_signal(signal.SIGTERM)
    try:
        code = gunicorn.proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gunicorn alive {STOP_TIMEOUT} s after SIGTERM:\n{gunicorn.log_text()}")
    log = gunicorn.log_text()
    assert code == 0, f"gunicorn exited with {code}:\n{log}"
    assert not [p for p in gunicorn.workers if psutil.pid_exists(p)], "workers outlived the master"
    assert "Shutting down: Master" in log
    for trouble in ("Traceback", "WORKER TIMEOUT", "was sent", "exited with code"):
        assert trouble not in log, f"{trouble!r} in gunicorn log:\n{log}"
    assert log.count("Booting worker") == WORKERS, f"workers were restarted:\n{log}"

#!/usr/bin/python3
"""gunicorn gthread workers stopped under keep-alive load: plain vs ebb.gthread.

gunicorn (2 workers, 4 threads, tests/integration/apps/flask_app.py) is
driven by wrk (2 threads, 4 keep-alive connections, --seconds); once a
second, one of its workers is sent SIGTERM (a graceful stop, as `ebb run
--children` or --max-requests does) and gunicorn forks a replacement.
Counts wrk's requests and socket errors (connect, read, write, timeout)
for each worker class, interleaved over --rounds rounds:

  gthread                    gunicorn 20.1's own
  ebb.gthread.ThreadWorker   python/ebb/gthread.py (drains keep-alive connections)

Errors are what a client of a recycled worker sees; nothing here is a timing
target. Needs wrk. Not part of `make test`.

    /usr/bin/python3 bench/gthread_keepalive.py --rounds 3
"""
import argparse
import os
import re
import signal
import subprocess
import threading
import time

from procs import children, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(REPO, "tests", "integration", "apps")
PY = "/usr/bin/python3"


def one_run(worker_class, seconds):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    g = subprocess.Popen([PY, "-m", "gunicorn", "--workers", "2", "--worker-class", worker_class, "--threads", "4",
                          "--bind", f"127.0.0.1:{port}", "--chdir", APPS, "--graceful-timeout", "20",
                          "flask_app:app"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while len(children(g.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    stops = [0]
    done = threading.Event()

    def stopper():
        while not done.wait(1.0):
            kids = children(g.pid)
            if kids:
                os.kill(kids[0], signal.SIGTERM)
                stops[0] += 1

    t = threading.Thread(target=stopper)
    t.start()
    out = subprocess.run(["wrk", "-t", "2", "-c", "4", "-d", f"{seconds}s", "--timeout", "20s",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 60).stdout
    done.set()
    t.join()
    g.terminate()
    g.wait(timeout=60)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in m.groups()) if m else 0
    return requests, errors, stops[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    classes = ["gthread", "ebb.gthread.ThreadWorker"]
    rows = {c: [] for c in classes}
    for r in range(args.rounds):
        for c in (classes if r % 2 == 0 else classes[::-1]):
            res = one_run(c, args.seconds)
            rows[c].append(res)
            print(f"round {r + 1} {c}: {res[0]} requests, {res[1]} socket errors, {res[2]} workers stopped",
                  flush=True)
    print(f"\n{args.rounds} rounds of {args.seconds} s, wrk 4 keep-alive connections, one of 2 workers stopped a second")
    print(f"{'worker class':28} {'requests':>10} {'errors':>8} {'errors per 10k':>15}")
    for c in classes:
        req = sum(x[0] for x in rows[c])
        err = sum(x[1] for x in rows[c])
        print(f"{c:28} {req:10} {err:8} {err * 1e4 / max(req, 1):15.1f}")


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""A long-running queue worker for the `make demo` fleet.

It works like a Celery or RQ worker with the usual problems: tasks come in
bursts with idle gaps (the queue is empty), one task in ten is large (seed
002's big kwargs), and a per-process cache grows with every task (FLEET_LEAK_KB,
default 100) and is never trimmed: a leak, as most long-running Python
workers have.
Tasks are the JSON jobs of examples/worker.py. On SIGTERM it finishes the
task in progress, writes how many tasks it did to $FLEET_DIR/done-<pid>,
and exits 0.
"""
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from worker import make_payload, task  # noqa: E402

stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


def main():
    # --seconds N: stop by itself after N seconds (for ebb compare); default: run until SIGTERM.
    end = time.monotonic() + float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else None
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # The same tasks every run: FLEET_SEED, else the worker's number under ebb run.
    rng = random.Random(int(os.environ.get("FLEET_SEED") or os.environ.get("EBB_WORKER_ID") or os.getpid()))
    leak = int(os.environ.get("FLEET_LEAK_KB", "100")) * 1000
    cache = {}  # grows forever: FLEET_LEAK_KB (default 100) per task
    done = 0
    while not stopping and (end is None or time.monotonic() < end):
        for _ in range(rng.randrange(10, 30)):  # a burst
            records = 40_000 if rng.random() < 0.1 else rng.randrange(500, 4000)
            rows, size = task(make_payload(rng, records))
            cache[done] = "r" * leak + str(done)
            done += 1
            if stopping:
                break
        deadline = time.monotonic() + rng.uniform(0.5, 2.0)  # the queue is empty for a while
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
    with open(os.path.join(os.environ.get("FLEET_DIR", "."), f"done-{os.getpid()}"), "w") as f:
        f.write(str(done))


if __name__ == "__main__":
    main()

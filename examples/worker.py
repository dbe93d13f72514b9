#!/usr/bin/python3
"""A worker-like example for ebb compare: bursts of tasks with idle gaps.

Like a Celery or RQ worker, it takes tasks in batches; each task parses a
JSON payload, builds per-record dicts and a report, and returns a small
result; between batches the worker waits for the queue. Some tasks are
large (seed 002: big kwargs), so memory peaks during a burst and is all
garbage afterwards. What a fleet pays for is the memory held during the
idle gaps, which is where allocators differ.

    ebb compare --plot worker.html -- /usr/bin/python3 examples/worker.py
"""
import argparse
import json
import random
import time


def make_payload(rng, records):
    return json.dumps([{"id": i, "user": f"user-{rng.randrange(10**6)}", "tags": ["a" * rng.randrange(1, 40)
                        for _ in range(rng.randrange(1, 6))], "amount": rng.random() * 1000}
                       for i in range(records)])


def task(payload):
    rows = json.loads(payload)
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    report = "\n".join(f"{u}: {len(rs)} rows, {sum(r['amount'] for r in rs):.2f}" for u, rs in by_user.items())
    return len(rows), len(report)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=30, help="tasks per batch")
    ap.add_argument("--idle", type=float, default=1.5, help="seconds between batches")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    done = 0
    for _ in range(args.batches):
        results = []
        for _ in range(args.tasks):
            records = 60_000 if rng.random() < 0.1 else rng.randrange(500, 5000)  # now and then a big one
            results.append(task(make_payload(rng, records)))
        done += len(results)
        del results
        time.sleep(args.idle)  # waiting for the queue
    print(f"{done} tasks")


if __name__ == "__main__":
    main()

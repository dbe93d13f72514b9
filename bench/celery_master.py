#!/usr/bin/python3
"""Seed 002: a Celery master fed large kwargs, under glibc and under ebb.

A prefork worker (`--concurrency 2`, prefetch 4) takes tasks whose single
argument is a document of 1-20 MB (log-uniform) whose structure changes
from task to task: rows of short strings, one long string, a tree of
dicts, or a mix. The main process (MainProcess, the master) holds every
prefetched message several times over while it passes them to the pool.
The benchmark samples the master's own RSS (not its children's) while
--tasks tasks are queued in bursts, then --idle seconds after the queue is
empty, for each variant, interleaved over --rounds rounds:

  glibc:  python3 -m celery ... (glibc malloc, CPython's pymalloc)
  ebb:    ebb run --children --soft-limit S -- python3 -m ebb.celery ...
          (libebb in the master and the pool; the master trimmed above S)
  jemalloc (with --jemalloc PATH): the plain worker with LD_PRELOAD

Prints, per variant: the master's RSS after the first burst, its peak, at
the end of the last burst and after the idle time, and the slope of its
RSS over the run (MB per 100 tasks, least squares); a JSON line per run.
Needs redis-server. Not part of `make test`.

    /usr/bin/python3 bench/celery_master.py --ebb build/bin/ebb --lib build/lib/libebb.so
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from procs import children, free_port, proc_kb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "bench", "celery_master")
PY = "/usr/bin/python3"


def rss(pid):
    return proc_kb(pid, "status", "VmRSS:") * 1024


def document(rng, size):
    """About `size` bytes of JSON whose shape depends on the draw."""
    kind = rng.choice(["rows", "blob", "tree", "mix"])
    if kind == "rows":
        return {"rows": ["r%07d-%s" % (i, "x" * rng.randint(4, 40)) for i in range(size // 30)]}
    if kind == "blob":
        return {"blob": "b" * size}
    if kind == "tree":
        return {"tree": {f"k{i}": {"id": i, "v": [i] * rng.randint(1, 8), "s": "t" * rng.randint(8, 64)}
                         for i in range(size // 90)}}
    return {"rows": ["m%d" % i for i in range(size // 24)], "blob": "m" * (size // 2)}


def queue(redis_url, tasks, seed, burst, pause, on_burst):
    """Queues `tasks` documents in bursts of `burst` from a child process
    (a fresh import of the app), calling on_burst() after each."""
    env = {**os.environ, "EBB_BENCH_REDIS": redis_url}
    code = f"""
import random, sys, time
sys.path.insert(0, {HERE!r}); sys.path.insert(0, {os.path.join(REPO, 'bench')!r})
from app import handle
from celery_master import document
rng = random.Random({seed})
for i in range({tasks}):
    size = int(2 ** rng.uniform(20, 24.32))  # 1-20 MB, log-uniform
    handle.delay(document(rng, size))
    if (i + 1) % {burst} == 0:
        print(i + 1, flush=True)
        time.sleep({pause})
"""
    p = subprocess.Popen([PY, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        on_burst(int(line))
    return p.wait()


def run_variant(name, args, redis_url, seed):
    import redis
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    env = {**os.environ, "EBB_BENCH_REDIS": redis_url, "PYTHONPATH": os.path.join(REPO, "python")}
    worker = ["-A", "app", "--workdir", HERE, "worker", "--pool", "prefork", "--concurrency", "2", "-l", "warning"]
    if name == "ebb":
        env["EBB_LIB"] = args.lib
        cmd = [args.ebb, "run", "--children", "--soft-limit", args.soft_limit, "--metric", "rss", "--",
               PY, "-m", "ebb.celery", *worker]
    else:
        cmd = [PY, "-m", "celery", *worker]
        if name == "jemalloc":
            env["LD_PRELOAD"] = args.jemalloc
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    time.sleep(3)
    master = children(proc.pid)[0] if name == "ebb" else proc.pid
    samples = []  # (tasks queued, rss)
    queued = [0]

    def sample():
        samples.append((queued[0], rss(master)))

    def on_burst(n):
        queued[0] = n
        while r.llen("celery") > 0:  # let the worker take the burst before the next
            sample()
            time.sleep(0.25)
        sample()

    t0 = time.monotonic()
    rc = queue(redis_url, args.tasks, seed, args.burst, 0.5, on_burst)
    busy_s = time.monotonic() - t0
    end_busy = rss(master)
    time.sleep(args.idle)
    end_idle = rss(master)
    proc.terminate()
    try:
        proc.wait(timeout=60)
        hung = False
    except subprocess.TimeoutExpired:  # Celery's warm shutdown can hang (docs/run.md)
        hung = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its pool
    except ProcessLookupError:
        pass
    if rc != 0:
        sys.exit(f"{name}: the producer failed")
    after_first = next(m for n, m in samples if n >= args.burst)
    xs = [n for n, m in samples if n >= args.burst]
    ys = [m for n, m in samples if n >= args.burst]
    slope = statistics.linear_regression(xs, ys).slope * 100 if len(set(xs)) > 1 else 0.0
    return {"variant": name, "seed": seed, "after_first_burst": after_first, "peak": max(m for _, m in samples),
            "end_busy": end_busy, "end_idle": end_idle, "slope_per_100_tasks": slope, "busy_s": busy_s,
            "shutdown_hung": hung}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ebb", default=os.path.join(REPO, "build", "bin", "ebb"))
    ap.add_argument("--lib", default=os.path.join(REPO, "build", "lib", "libebb.so"))
    ap.add_argument("--jemalloc", help="path of libjemalloc.so.2, to add that variant")
    ap.add_argument("--tasks", type=int, default=240)
    ap.add_argument("--burst", type=int, default=12)
    ap.add_argument("--idle", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--soft-limit", default="150M", help="the master's (and each child's) soft limit under ebb")
    args = ap.parse_args()
    port = free_port()
    redis_srv = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{port}/0"
    variants = ["glibc", "ebb"] + (["jemalloc"] if args.jemalloc else [])
    results = {v: [] for v in variants}
    try:
        for rnd in range(args.rounds):
            for v in (variants if rnd % 2 == 0 else variants[::-1]):
                res = run_variant(v, args, url, seed=rnd)
                print(json.dumps(res), flush=True)
                results[v].append(res)
    finally:
        redis_srv.terminate()
    mb = 1 << 20
    print(f"\n{args.tasks} tasks of 1-20 MB kwargs in bursts of {args.burst}, {args.rounds} rounds; "
          "the master's RSS in MB (median of rounds)")
    print(f"{'variant':10} {'1st burst':>10} {'peak':>8} {'end':>8} {'idle':>8} {'MB/100 tasks':>13}")
    for v in variants:
        med = {k: statistics.median(x[k] for x in results[v]) for k in results[v][0]
               if k not in ("variant", "seed", "shutdown_hung")}
        print(f"{v:10} {med['after_first_burst'] / mb:10.0f} {med['peak'] / mb:8.0f} {med['end_busy'] / mb:8.0f} "
              f"{med['end_idle'] / mb:8.0f} {med['slope_per_100_tasks'] / mb:13.1f}")


if __name__ == "__main__":
    main()

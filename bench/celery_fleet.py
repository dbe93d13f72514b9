#!/usr/bin/python3
"""Seed 000 reproduced: one Celery prefork fleet fed the same task mix under
plain glibc, jemalloc (seed 000's fix), Celery's own --max-memory-per-child,
and `ebb run --children`.

The fleet is `--pool prefork --concurrency 4` on a private redis-server. A
producer thread keeps about 40 tasks queued for --duration seconds; each
task (bench/celery_fleet/app.py) gets a document of 10 KB-5 MB (log-uniform,
rows of strings, a blob, a tree of dicts, or a mix), builds a result from it,
keeps the result 0-10 s, and leaks 2 KB. The documents come from one seeded
generator, so every variant gets the same mix. Every second the benchmark
reads the PSS of every process of the fleet (/proc/PID/smaps_rollup: the
master, its pool, and ebb itself under ebb). After --duration it stops
producing, waits for the queue to drain, and stops the fleet with SIGTERM.

Variants (interleaved over --rounds rounds, order reversed every other one):

  glibc:    python3 -m celery -A app worker --pool prefork --concurrency 4
  jemalloc: the same with LD_PRELOAD=libjemalloc.so.2
  celery-max-memory: the same with --max-memory-per-child LIMIT
  ebb:      ebb run --children --hard-limit LIMIT --metric rss (--ebb-metric)
              -- python3 -m ebb.celery -A app worker ... (libebb in every process)

Per run: mean and peak fleet PSS, GB*s (the PSS integrated over the run),
tasks/s (completed during --duration), tasks lost (queued, never done) and
repeated (started or done more than once, from Redis), pool processes that
were replaced, and whether the shutdown hung; under ebb, the fleet's live and
free-but-resident heap bytes (libebb's counters through `ebb ps`, every 5 s).
The floor no allocator goes below is the idle fleet's PSS (read before the
first task) plus the live heap the tasks add above the idle fleet's (sums of
live bytes double-count what pool processes share with the master, so the
idle live bytes are subtracted, not the idle PSS). Then medians per variant, and
an SVG chart of fleet PSS over time (first round). Needs redis-server.
Not part of `make test`.

    /usr/bin/python3 bench/celery_fleet.py --duration 180 --rounds 2 --chart docs/img/celery-fleet.svg
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from charts import line_chart
from procs import free_port, proc_kb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "bench", "celery_fleet")
PY = "/usr/bin/python3"
CONCURRENCY = 4


def document(rng, size):
    """About `size` bytes of kwargs whose shape depends on the draw."""
    kind = rng.choice(["rows", "blob", "tree", "mix"])
    if kind == "rows":
        return {"rows": ["r%07d-%s" % (i, "x" * rng.randint(4, 40)) for i in range(size // 30)]}
    if kind == "blob":
        return {"blob": "b" * size}
    if kind == "tree":
        return {"tree": {f"k{i}": {"v": [i] * rng.randint(1, 8), "s": "t" * rng.randint(8, 64)}
                         for i in range(size // 90)}}
    return {"rows": ["m%d" % i for i in range(size // 48)], "blob": "m" * (size // 2)}


def tree(pid):
    """pid and all its descendants (children of any of their threads)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def pss_kb(pid):
    return proc_kb(pid, "smaps_rollup", "Pss:")


def command(variant, args):
    worker = ["-A", "app", "--workdir", HERE, "worker", "--pool", "prefork", "--concurrency", str(CONCURRENCY),
              "-l", "warning"]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    for k in ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF"):
        env.pop(k, None)
    if variant == "ebb":
        env["EBB_LIB"] = args.lib
        return [args.ebb, "run", "--children", "--hard-limit", args.ebb_limit or args.limit, "--metric", args.ebb_metric, "--",
                PY, "-m", "ebb.celery", *worker], env
    cmd = [PY, "-m", "celery", *worker]
    if variant == "jemalloc":
        env["LD_PRELOAD"] = args.jemalloc
    if variant == "celery-max-memory":
        cmd += ["--max-memory-per-child", str(parse_size(args.limit) // 1024)]  # Celery takes KiB
    return cmd, env


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def produce(app_job, r, seed, stop, sent):
    """Keeps about 40 tasks queued until stop is set; sent[0] counts them."""
    rng = random.Random(seed)
    while not stop.is_set():
        if r.llen("celery") >= 40:
            time.sleep(0.02)
            continue
        size = int(2 ** rng.uniform(13.3, 22.3))  # 10 KB - 5 MB, log-uniform
        app_job.delay(sent[0], document(rng, size), rng.uniform(0, 10))
        sent[0] += 1


def run_variant(variant, args, redis_url, seed):
    import redis
    sys.path.insert(0, HERE)
    os.environ["EBB_BENCH_REDIS"] = redis_url
    from app import job
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    cmd, env = command(variant, args)
    env["EBB_BENCH_REDIS"] = redis_url
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    # Ready when the pool runs: the master and 4 pool processes (plus ebb).
    want = CONCURRENCY + (2 if variant == "ebb" else 1)
    deadline = time.monotonic() + 60
    while len(tree(proc.pid)) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    # The idle fleet before any task: its PSS and its heaps' live bytes (ebb), the base of the floor.
    idle_pss_kb = sum(pss_kb(p) for p in tree(proc.pid))
    idle_live = heap_mb(args.ebb, proc.pid)[0] if variant == "ebb" else None
    stop, sent = threading.Event(), [0]
    producer = threading.Thread(target=produce, args=(job, r, seed, stop, sent))
    t0 = time.monotonic()
    producer.start()
    samples, pool, master_kb, heaps = [], set(), [], []
    master = tree(proc.pid)[1] if variant == "ebb" else proc.pid  # ebb's child is the master
    while time.monotonic() - t0 < args.duration:
        pids = tree(proc.pid)
        pool.update(pids)
        samples.append((time.monotonic() - t0, sum(pss_kb(p) for p in pids)))
        master_kb.append(pss_kb(master))
        if variant == "ebb" and len(samples) % 5 == 0:
            heaps.append(heap_mb(args.ebb, proc.pid))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
    done_in_time = r.hlen("done")
    stop.set()
    producer.join()
    deadline = time.monotonic() + 120
    while r.hlen("done") < sent[0] and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
        hung = False
    except subprocess.TimeoutExpired:  # Celery's warm shutdown can hang (docs/run.md)
        hung = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    started = {int(k): int(v) for k, v in r.hgetall("started").items()}
    done = {int(k): int(v) for k, v in r.hgetall("done").items()}
    log.seek(0)
    text = log.read().decode(errors="replace")
    series = [kb / 1024 for _, kb in samples]
    return {"variant": variant, "seed": seed, "duration_s": args.duration,
            "mean_pss_mb": statistics.mean(series), "peak_pss_mb": max(series),
            "master_mean_mb": statistics.mean(master_kb) / 1024,
            "gb_s": sum(series) / 1024,  # 1 s samples
            "tasks_per_s": done_in_time / args.duration, "tasks": sent[0],
            "lost": sum(1 for i in range(sent[0]) if done.get(i, 0) == 0),
            "repeated": sum(1 for i in range(sent[0]) if started.get(i, 0) > 1 or done.get(i, 0) > 1),
            "replaced": len(pool) - want, "shutdown_hung": hung,
            "worker_lost_errors": text.count("WorkerLostError"), "samples": samples,
            # libebb's own view (ebb variant): what the fleet's heaps hold live, and free but still resident.
            "heap_live_mb": statistics.mean(h[0] for h in heaps) if heaps else None,
            "heap_free_mb": statistics.mean(h[1] for h in heaps) if heaps else None,
            "idle_pss_mb": idle_pss_kb / 1024, "idle_live_mb": idle_live}


def heap_mb(ebb, root):
    """(live, free-resident) MB of the heaps of every libebb process under root, from `ebb ps`."""
    p = subprocess.run([ebb, "ps", "--json", "--tree", str(root)], capture_output=True, text=True, timeout=30)
    total = json.loads(p.stdout)["total"] if p.returncode == 0 else {"heap_live": 0, "heap_free": 0}
    return total["heap_live"] / 2**20, total["heap_free"] / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ebb", default=os.path.join(REPO, "build", "bin", "ebb"))
    ap.add_argument("--lib", default=os.path.join(REPO, "build", "lib", "libebb.so"))
    ap.add_argument("--jemalloc", default="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    ap.add_argument("--variants", default="glibc,jemalloc,celery-max-memory,ebb")
    ap.add_argument("--duration", type=float, default=180, help="seconds of load per run (default: 180)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", default="150M", help="a pool process's limit: ebb's --hard-limit (RSS) and "
                    "Celery's --max-memory-per-child (default: 150M)")
    ap.add_argument("--ebb-limit", help="ebb's --hard-limit, if not --limit")
    ap.add_argument("--ebb-metric", default="rss", choices=["rss", "pss", "uss"],
                    help="what ebb's --hard-limit measures (default: rss; Celery's limit reads ru_maxrss, "
                    "the peak RSS, which a pool process inherits from the master)")
    ap.add_argument("--chart", help="write the SVG chart of fleet PSS over time (first round) here")
    ap.add_argument("--json", help="write every run, samples included, here")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if "jemalloc" in variants and not os.path.exists(args.jemalloc):
        sys.exit(f"celery_fleet.py: {args.jemalloc} not found (Debian package libjemalloc2)")
    port = free_port()
    redis_srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{port}/0"
    runs = []
    try:
        for rnd in range(args.rounds):
            for v in (variants if rnd % 2 == 0 else variants[::-1]):
                res = run_variant(v, args, url, seed=rnd)
                print(json.dumps({k: x for k, x in res.items() if k != "samples"}), flush=True)
                runs.append(res)
    finally:
        redis_srv.terminate()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)
    keys = ["mean_pss_mb", "peak_pss_mb", "master_mean_mb", "gb_s", "tasks_per_s", "lost", "repeated", "replaced"]
    med = {v: {k: statistics.median(r[k] for r in runs if r["variant"] == v) for k in keys} for v in variants}
    base = med.get("glibc")
    print(f"\nCelery prefork --concurrency {CONCURRENCY}, {args.duration:.0f} s of load, {args.rounds} round(s), "
          f"limit {args.limit}" + (f", ebb's {args.ebb_limit}" if args.ebb_limit else "") + "; medians")
    print("| variant | mean fleet PSS MB | vs glibc | peak MB | master mean MB | GB*s | tasks/s | vs glibc | lost | "
          "repeated | pool processes replaced |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        m = med[v]
        ratio = f"{m['mean_pss_mb'] / base['mean_pss_mb']:.2f}x" if base else ""
        speed = f"{m['tasks_per_s'] / base['tasks_per_s']:.2f}x" if base else ""
        print(f"| {v} | {m['mean_pss_mb']:.0f} | {ratio} | {m['peak_pss_mb']:.0f} | {m['master_mean_mb']:.0f} | "
              f"{m['gb_s']:.1f} | "
              f"{m['tasks_per_s']:.1f} | {speed} | {m['lost']:.0f} | {m['repeated']:.0f} | {m['replaced']:.0f} |")
    for v in variants:
        live = [r["heap_live_mb"] for r in runs if r["variant"] == v and r["heap_live_mb"] is not None]
        if live:
            mine = [r for r in runs if r["variant"] == v]
            free = statistics.median(r["heap_free_mb"] for r in mine)
            idle = statistics.median(r["idle_pss_mb"] for r in mine)
            grown = statistics.median(r["heap_live_mb"] - r["idle_live_mb"] for r in mine)
            print(f"{v}: idle fleet PSS {idle:.0f} MB before the first task; live heap above idle, mean "
                  f"{grown:.0f} MB; free not yet purged, mean {free:.0f} MB. Floor (idle PSS + live heap "
                  f"above idle): {idle + grown:.0f} MB")
    hung = [r["variant"] for r in runs if r["shutdown_hung"]]
    if hung:
        print(f"shutdown hung (killed after 60 s): {', '.join(hung)}")
    if args.chart:
        first = [r for r in runs if r["seed"] == 0]
        line_chart([(r["variant"], [(t, kb / 1024) for t, kb in r["samples"]]) for r in first], args.chart,
                   f"Celery prefork fleet PSS (MB), {CONCURRENCY} pool processes + master")
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()

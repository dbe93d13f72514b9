#!/usr/bin/python3
"""Fork-server benchmark: fleet PSS of 8 workers of one app, five ways.

The app (bench/preload_app/app.py) imports Flask, SQLAlchemy, NumPy and
pandas and loads reference data; each request reads it and allocates. The
same 8-worker fleet is started as

  plain          ebb run -w 8 --allocator pymalloc -- python3 server.py  (each worker imports the app)
  gunicorn       gunicorn -w 8 --preload app:app                          (forked from a loaded master)
  gunicorn+freeze  the same with ebb.gunicorn's gc.freeze hooks
  ebb-preload    ebb run -w 8 --allocator pymalloc --preload app -- python3 server.py
  ebb-preload+libebb  the same under libebb (ebb run's default allocator)

A load generator (asyncio, in this script) then sends it exactly
--requests requests for random items (a few thousand per worker), while the PSS of every process of the fleet (the master or ebb,
the fork server, the workers) is sampled each second. Sharing must survive
work, not just start-up: the figure that counts is the fleet PSS at the end.

Configurations run interleaved, --runs times each; the report gives the
median per configuration and its ratio to plain. Writes
<out>/preload.json and <out>/preload.svg (mean PSS per worker over time,
first run).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
APP = os.path.join(HERE, "preload_app")
PY = "/usr/bin/python3"
WORKERS = 8

sys.path.insert(0, os.path.join(REPO, "examples"))
from fleet_demo import descendants, pss_kb  # noqa: E402 - the demo's /proc readers

from procs import free_port  # noqa: E402 - beside the demo's readers


async def _load(port, requests, connections, seed):
    """Exactly `requests` GETs of random items over `connections` concurrent
    connections, one request per connection (like gunicorn's sync workers,
    which close after each response). Returns (ok, failed)."""
    import asyncio
    import random
    rnd = random.Random(seed)
    left, ok, failed = requests, 0, 0

    async def client():
        nonlocal left, ok, failed
        while left > 0:
            left -= 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET /item/{rnd.randrange(100_000)} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                await writer.drain()
                status = await reader.readline()
                await reader.read()  # the rest, until the server closes
                writer.close()
                if status.split()[1:2] == [b"200"]:
                    ok += 1
                else:
                    failed += 1
            except (OSError, IndexError, asyncio.IncompleteReadError):
                failed += 1

    await asyncio.gather(*(client() for _ in range(connections)))
    return ok, failed


def load(port, requests, connections, seed):
    import asyncio
    return asyncio.run(_load(port, requests, connections, seed))


def commands(name, port, ebb_bin, ebb_lib):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC", "PYTHONPATH")}
    env["PYTHONPATH"] = os.path.join(REPO, "python")  # ebb.gunicorn for the freeze hooks
    env["EBB_LIB"] = ebb_lib
    server = [PY, "server.py", str(port)]
    gunicorn = [PY, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                "--backlog", "256"]
    quiet = ["--log-format", "json"]
    return {
        "plain": ([ebb_bin, "run", *quiet, "-w", str(WORKERS), "--allocator", "pymalloc", "--", *server], env),
        "gunicorn": ([*gunicorn, "--preload", "app:app"], env),
        "gunicorn+freeze": ([*gunicorn, "-c", "gunicorn_freeze.py", "app:app"], env),
        "ebb-preload": ([ebb_bin, "run", *quiet, "-w", str(WORKERS), "--allocator", "pymalloc", "--preload", "app",
                         "--", *server], env),
        "ebb-preload+libebb": ([ebb_bin, "run", *quiet, "-w", str(WORKERS), "--preload", "app", "--", *server], env),
    }[name]


def wait_ready(port, proc, timeout=120):
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the fleet exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the fleet did not answer within the timeout")


def workers_up(root):
    """Number of processes answering as workers: the fleet's tree minus its root (and fork server)."""
    return len(descendants(root)) - 1


def run_one(name, args, run_index):
    port = free_port()
    argv, env = commands(name, port, args.ebb, args.lib)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=APP, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    samples, stop = [], threading.Event()
    t0 = time.monotonic()
    try:
        wait_ready(port, proc)
        deadline = time.monotonic() + 60
        while workers_up(proc.pid) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)

        def sample():
            while not stop.is_set():
                pids = descendants(proc.pid)
                samples.append((round(time.monotonic() - t0, 2), sum(pss_kb(p) for p in pids), len(pids)))
                stop.wait(1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stop.wait(1.5)
        start_kb = samples[0][1]
        served, errors = load(port, args.requests, args.connections, seed=run_index)
        stop.wait(2)
        stop.set()
        sampler.join()
        end = samples[-3:]
        return {"config": name, "requests": served, "errors": errors, "start_kb": start_kb,
                "end_kb": int(statistics.median(s[1] for s in end)), "processes": end[-1][2],
                "seconds": round(time.monotonic() - t0, 1), "samples": samples}
    finally:
        stop.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM, 1):
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-2000:])


def svg(runs, path):
    """Mean PSS per worker (fleet PSS / 8, MB) over time, one line per configuration."""
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd"]
    w, h, left, bottom, top, right = 760, 380, 60, 40, 30, 180
    t_max = max(s[0] for r in runs for s in r["samples"]) or 1
    y_max = max(s[1] for r in runs for s in r["samples"]) / 1024 / WORKERS
    step = next(x for x in (10, 20, 25, 50, 100, 200) if y_max / x <= 8)
    y_top = step * (int(y_max // step) + 1)
    sx = lambda t: left + (w - left - right) * t / t_max  # noqa: E731
    sy = lambda mb: h - bottom - (h - bottom - top) * mb / y_top  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">PSS per worker (MB, fleet PSS / {WORKERS}) while serving</text>']
    for i in range(int(y_top // step) + 1):
        y = sy(i * step)
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step}</text>')
    for t in range(0, int(t_max) + 1, 10 if t_max <= 80 else 20):
        out.append(f'<text x="{sx(t):.1f}" y="{h - bottom + 16}" text-anchor="middle">{t} s</text>')
    for i, (r, color) in enumerate(zip(runs, colors)):
        pts = " ".join(f"{sx(s[0]):.1f},{sy(s[1] / 1024 / WORKERS):.1f}" for s in r["samples"])
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        out.append(f'<rect x="{w - right + 12}" y="{top + 4 + 18 * i}" width="14" height="4" fill="{color}"/>'
                   f'<text x="{w - right + 32}" y="{top + 10 + 18 * i}">{r["config"]}</text>')
    out.append("</svg>\n")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ebb", default=os.path.join(REPO, "build", "bin", "ebb"))
    ap.add_argument("--lib", default=os.environ.get("EBB_LIB", os.path.join(REPO, "build", "lib", "libebb.so")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=24000, help="per run: about 3000 per worker (default)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--configs", default="plain,gunicorn,gunicorn+freeze,ebb-preload,ebb-preload+libebb")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "bench"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    configs = args.configs.split(",")
    results = []
    for run in range(args.runs):
        for name in configs:
            r = run_one(name, args, run)
            r["run"] = run
            results.append(r)
            print(f"run {run + 1} {name:20} start {r['start_kb'] / 1024:7.1f} MB  end {r['end_kb'] / 1024:7.1f} MB  "
                  f"{r['requests']} requests, {r['errors']} errors, {r['processes']} processes, {r['seconds']} s",
                  flush=True)
    with open(os.path.join(args.out, "preload.json"), "w") as f:
        json.dump(results, f)
    svg([r for r in results if r["run"] == 0], os.path.join(args.out, "preload.svg"))
    med = {c: statistics.median(r["end_kb"] for r in results if r["config"] == c) for c in configs}
    med_start = {c: statistics.median(r["start_kb"] for r in results if r["config"] == c) for c in configs}
    reqs = {c: statistics.median(r["requests"] for r in results if r["config"] == c) for c in configs}
    base = med.get("plain")
    print(f"\n{args.runs} runs, median fleet PSS of {WORKERS} workers (all processes of the fleet):")
    print("| configuration | fleet PSS at start | fleet PSS after load | per worker | vs plain | requests |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in configs:
        ratio = f"{med[c] / base:.2f}x" if base else "-"
        print(f"| {c} | {med_start[c] / 1024:.0f} MB | {med[c] / 1024:.0f} MB | {med[c] / 1024 / WORKERS:.1f} MB | "
              f"{ratio} | {reqs[c]:.0f} |")
    print(f"chart: {os.path.join(args.out, 'preload.svg')}")


if __name__ == "__main__":
    main()

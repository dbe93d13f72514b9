#!/usr/bin/python3
"""What profiling costs a web app: gunicorn + Flask under wrk, unprofiled and profiled.

One gunicorn sync worker (tests/integration/apps/flask_app.py, GET
/json?n=300: a JSON list of 300 small dicts per request, so allocation
bound like a real API) runs under libebb with PYTHONMALLOC=malloc, pinned to
--cpu; wrk (1 thread, 4 connections) runs on the other CPUs. Each round
starts every variant once, in turn (interleaved, so machine noise spreads
evenly), warms it for --warmup seconds, then measures --seconds:

  ebb                 libebb, unprofiled: the baseline
  ebb+profile         EBB_PROFILE at the default rate (one byte in 512 KiB)
  ebb+profile-native  the same with native stacks
  ebb+profile-all     every allocation and free, with Python stacks
  ebb+tracemalloc     libebb with PYTHONTRACEMALLOC=25 (CPython's own, 25 frames)

Per variant: median requests/s, its ratio to the baseline's (cost = baseline
requests/s over the variant's: 1.03x means 3% slower), the worker's peak
RSS (VmHWM) and what it wrote (captures). Needs wrk. Not part of `make test`.

    EBB_LIB=build/lib/libebb.so /usr/bin/python3 bench/profile_wrk.py --rounds 5 --cpu 1
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocators  # noqa: E402
from procs import children, free_port, proc_kb  # noqa: E402
from profile_overhead import human  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "integration" / "apps"
WRK = "/usr/bin/wrk"
VARIANTS = ["ebb", "ebb+profile", "ebb+profile-native", "ebb+profile-all", "ebb+tracemalloc"]
PATH = "/json?n=300"


def environment(variant, lib, out_dir):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith(("PYTHON", "EBB_"))}
    env.update(PYTHONMALLOC="malloc", LD_PRELOAD=lib, PYTHONPATH=str(REPO / "python"))
    prefix = str(out_dir / "cap")
    if variant == "ebb+profile":
        env.update(EBB_PROFILE=prefix, EBB_PROFILE_RATE="524288")
    elif variant == "ebb+profile-native":
        env.update(EBB_PROFILE=prefix, EBB_PROFILE_RATE="524288", EBB_PROFILE_NATIVE="1")
    elif variant == "ebb+profile-all":
        env.update(EBB_PROFILE=prefix, EBB_PROFILE_RATE="1")
    elif variant == "ebb+tracemalloc":
        env["PYTHONTRACEMALLOC"] = "25"
    return env


def wait_ready(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{PATH}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer on port {port} within {timeout} s")


def wrk(port, seconds, cpus):
    cmd = [WRK, "-t", "1", "-c", "4", "-d", f"{seconds}s", "--timeout", "10s", f"http://127.0.0.1:{port}{PATH}"]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    if "Socket errors" in out or "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))


def one_run(variant, lib, a, wrk_cpus):
    """(requests/s, worker peak RSS bytes, bytes written)."""
    out_dir = Path(tempfile.mkdtemp(prefix="ebb-prof-wrk-"))
    port = free_port()
    cmd = ["/usr/bin/gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}", "--chdir", str(APPS),
           "--log-level", "warning", "flask_app:app"]
    if a.cpu is not None:
        cmd = ["taskset", "-c", str(a.cpu), *cmd]
    g = subprocess.Popen(cmd, env=environment(variant, lib, out_dir), stderr=subprocess.DEVNULL)
    try:
        wait_ready(port)
        wrk(port, a.warmup, wrk_cpus)
        rps = wrk(port, a.seconds, wrk_cpus)
        workers = children(g.pid)
        peak = proc_kb(workers[0], "status", "VmHWM:") * 1024 if workers else 0
        return rps, peak, out_dir
    finally:
        g.terminate()
        try:
            g.wait(timeout=30)
        except subprocess.TimeoutExpired:
            g.kill()
            g.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5, help="runs per variant, interleaved (default: %(default)s)")
    ap.add_argument("--seconds", type=int, default=8, help="measured wrk run (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="wrk run before it, not counted (default: %(default)s)")
    ap.add_argument("--cpu", type=int, metavar="N", help="pin gunicorn to CPU N, wrk to the others")
    a = ap.parse_args()
    if not os.path.exists(WRK):
        sys.exit("profile_wrk.py: needs wrk (scripts/install-deps installs it)")
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"profile_wrk.py: unknown variant(s) {', '.join(unknown)}")
    lib = str(allocators.ebb_lib())
    if not os.path.exists(lib):
        sys.exit("profile_wrk.py: no libebb; set EBB_LIB=path/to/libebb.so")
    wrk_cpus = ""
    if a.cpu is not None:
        wrk_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != a.cpu)
    print(f"# bench/profile_wrk.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, rounds {a.rounds}, "
          f"{a.seconds} s each, gunicorn on cpu {a.cpu}, wrk on {wrk_cpus or 'any'}, libebb {lib}", flush=True)
    results = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            rps, peak, out_dir = one_run(v, lib, a, wrk_cpus)
            written = sum(f.stat().st_size for f in out_dir.iterdir())
            shutil.rmtree(out_dir, ignore_errors=True)
            results[v].append((rps, peak, written))
            print(f"round {r} {v:20s} {rps:9.1f} req/s  peak RSS {human(peak):>7s}  wrote {human(written):>7s}",
                  flush=True)
    base = statistics.median(x[0] for x in results[variants[0]])
    print(f"\n| variant | requests/s (median of {a.rounds}) | cost vs {variants[0]} | worker peak RSS | wrote |")
    print("|---|---|---|---|---|")
    for v in variants:
        rps = statistics.median(x[0] for x in results[v])
        peak = statistics.median(x[1] for x in results[v])
        written = statistics.median(x[2] for x in results[v])
        print(f"| {v} | {rps:.0f} | {base / rps:.3f}x | {human(peak)} | {human(written)} |")


if __name__ == "__main__":
    main()

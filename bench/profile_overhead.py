#!/usr/bin/python3
"""What profiling costs: bench/speed's scripts unprofiled and under each profiler.

Variants (every one runs each script --runs times, interleaved: one of each
per round, so machine noise spreads evenly):

  ebb                 libebb, PYTHONMALLOC=malloc: the baseline of the next three
  ebb+profile         ebb profile at the default rate (one byte in 512 KiB)
  ebb+profile-all     ebb profile --all: every allocation and free, with Python stacks
  ebb+profile-native  ebb profile --native at the default rate: native stacks too
  ebb+tracemalloc     libebb with python3 -X tracemalloc=25 (CPython's own, 25 frames)
  glibc               glibc malloc, PYTHONMALLOC=malloc: heaptrack's baseline
  heaptrack           Debian's heaptrack (native stacks) on glibc

The ratio column is the variant's median wall time over its baseline's
median in the same run (ebb for the first five, glibc for heaptrack). Also
per variant: median peak RSS of the process (wait4's ru_maxrss) and the size
of what it wrote (captures; heaptrack's compressed data file). Each script
prints a checksum; one that differs between variants is a failure.

    bench/profile_overhead.py --runs 5 --cpu 1

A variant may name another build of libebb: `ebb+profile-all@/tmp/x/libebb.so`
(to measure a change, or a floor, in the same run as the baseline).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocators  # noqa: E402

SPEED_DIR = Path(__file__).resolve().parent / "speed"
SCRIPTS = sorted(p.stem for p in SPEED_DIR.glob("*.py") if not p.stem.startswith("_"))
VARIANTS = ["ebb", "ebb+profile", "ebb+profile-all", "ebb+profile-native", "ebb+tracemalloc", "glibc", "heaptrack"]
BASELINE = {"ebb": "ebb", "ebb+profile": "ebb", "ebb+profile-all": "ebb", "ebb+profile-native": "ebb",
            "ebb+tracemalloc": "ebb", "glibc": "glibc", "heaptrack": "glibc"}


def command(variant, script, out_dir, lib):
    """(argv, env) of one run; what it writes goes in out_dir."""
    variant, _, other = variant.partition("@")  # VARIANT@/path/libebb.so: that build instead
    lib = other or lib
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith(("PYTHON", "EBB_"))}
    env["PYTHONMALLOC"] = "malloc"
    argv = [allocators.PYTHON, str(SPEED_DIR / f"{script}.py")]
    if variant.startswith("ebb"):
        env["LD_PRELOAD"] = lib
    if variant == "ebb+profile":
        env.update(EBB_PROFILE=str(out_dir / "cap"), EBB_PROFILE_RATE="524288")
    elif variant == "ebb+profile-all":
        env.update(EBB_PROFILE=str(out_dir / "cap"), EBB_PROFILE_RATE="1")
    elif variant == "ebb+profile-native":
        env.update(EBB_PROFILE=str(out_dir / "cap"), EBB_PROFILE_RATE="524288", EBB_PROFILE_NATIVE="1")
    elif variant == "ebb+tracemalloc":
        argv = [allocators.PYTHON, "-X", "tracemalloc=25", *argv[1:]]
    elif variant == "heaptrack":
        argv = ["heaptrack", "-o", str(out_dir / "heaptrack"), *argv]
    return argv, env


def run_once(variant, script, lib, cpu, timeout):
    """(wall s, bytes written, stdout)."""
    out_dir = Path(tempfile.mkdtemp(prefix="ebb-prof-bench-"))
    try:
        argv, env = command(variant, script, out_dir, lib)
        pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        start = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=pre)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise RuntimeError(f"{variant} {script}: timed out after {timeout} s") from None
        wall = time.perf_counter() - start
        # The child is reaped by communicate(); its peak comes from RUSAGE_CHILDREN's change.
        if p.returncode != 0:
            raise RuntimeError(f"{variant} {script}: exit status {p.returncode}: {err.strip()[-300:]}")
        written = sum(f.stat().st_size for f in out_dir.iterdir())
        return wall, written, out
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def peak_rss(variant, script, lib, cpu, timeout):
    """Peak RSS of one run, from wait4 (a separate run: communicate() hides the rusage)."""
    out_dir = Path(tempfile.mkdtemp(prefix="ebb-prof-bench-"))
    try:
        argv, env = command(variant, script, out_dir, lib)
        pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pre)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                return ru.ru_maxrss * 1024
            if time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"{variant} {script}: timed out")
            time.sleep(0.01)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def human(n):
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated scripts of speed/")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--runs", type=int, default=5, help="timed runs per (script, variant) (default: %(default)s)")
    ap.add_argument("--cpu", type=int, metavar="N", help="pin every child to CPU N")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    lib = allocators.ebb_lib()
    scripts = [s for s in args.scripts.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        name = v.partition("@")[0]
        if name not in VARIANTS:
            ap.error(f"unknown variant {v}")
        if BASELINE[name] not in variants:
            ap.error(f"{v} needs its baseline {BASELINE[name]} in --variants")
    if "heaptrack" in variants and shutil.which("heaptrack") is None:
        ap.error("heaptrack is not installed (apt install heaptrack)")
    print(f"# bench/profile_overhead.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"runs {args.runs}, cpu {args.cpu}, libebb {lib}", flush=True)
    errors = []
    ratios = {v: [] for v in variants}
    rows = []
    for script in scripts:
        walls = {v: [] for v in variants}
        written = {v: [] for v in variants}
        outputs = {}
        for _ in range(args.runs):
            for v in variants:
                try:
                    w, n, c = run_once(v, script, lib, args.cpu, args.timeout)
                except RuntimeError as e:
                    errors.append(str(e))
                    continue
                walls[v].append(w)
                written[v].append(n)
                outputs.setdefault(v, []).append(c)
        # The script's checksum is its last line; heaptrack adds lines of its own around it.
        sums = {o.strip().splitlines()[-1] for v, runs in outputs.items() if v != "heaptrack" for o in runs}
        if len(sums) > 1:
            errors.append(f"{script}: checksums differ: {sums}")
        for o in outputs.get("heaptrack", []):
            if sums and not sums & set(o.splitlines()):
                errors.append(f"{script}: heaptrack's run printed no checksum among {sums}")
        rss = {}
        for v in variants:
            try:
                rss[v] = peak_rss(v, script, lib, args.cpu, args.timeout)
            except RuntimeError as e:
                errors.append(str(e))
        for v in variants:
            base = BASELINE[v.partition("@")[0]]
            if not walls[v] or not walls[base]:
                continue
            med = statistics.median(walls[v])
            ratio = med / statistics.median(walls[base])
            ratios[v].append(ratio)
            rows.append((script, v, med, ratio, rss.get(v, 0), statistics.median(written[v])))
            print(f"{script:16} {v:16} median {med:7.3f} s  x{ratio:5.2f}  peak RSS {human(rss.get(v, 0)):>7}"
                  f"  wrote {human(statistics.median(written[v])):>7}", flush=True)
    print("\ngeometric mean of the ratios to the baseline:")
    for v in variants:
        if ratios[v]:
            g = statistics.geometric_mean(ratios[v])
            print(f"  {v:16} x{g:.3f}  (max x{max(ratios[v]):.2f})")
    if errors:
        print("\nFailures:\n" + "\n".join(f"- {e}" for e in errors))
        sys.exit(1)


if __name__ == "__main__":
    main()

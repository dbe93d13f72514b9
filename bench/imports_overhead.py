#!/usr/bin/python3
"""What `ebb imports` costs: the wall time of a Python command's imports, measured and not.

Each round runs every variant once, in turn (interleaved, so machine noise
spreads evenly), pinned to --cpu:

  ebb          the command under libebb (LD_PRELOAD, PYTHONMALLOC=malloc): the baseline
  imports      ebb imports -o /dev/null -- the command
  usage        ebb imports --usage -o /dev/null -- the command (the profile hook on)

Per variant: the median wall time from start to exit (report written) and its
ratio to the baseline's. Not part of `make test`.

    /usr/bin/python3 bench/imports_overhead.py --rounds 7 --cpu 1 -- /usr/bin/python3 -c 'import flask'
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cpu", type=int, default=None, help="pin every run to this CPU (taskset)")
    p.add_argument("--ebb", default=str(REPO / "build/bin/ebb"))
    p.add_argument("--lib", default=os.environ.get("EBB_LIB", str(REPO / "build/lib/libebb.so")))
    p.add_argument("command", nargs="+")
    a = p.parse_args()
    pin = ["taskset", "-c", str(a.cpu)] if a.cpu is not None else []
    base_env = dict(os.environ, LD_PRELOAD=a.lib, PYTHONMALLOC="malloc")
    variants = {
        "ebb": (pin + a.command, base_env),
        "imports": (pin + [a.ebb, "imports", "-o", "/dev/null", "--"] + a.command, os.environ),
        "usage": (pin + [a.ebb, "imports", "--usage", "-o", "/dev/null", "--"] + a.command, os.environ),
    }
    times = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, (argv, env) in variants.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ebb"])
    print(f"command: {' '.join(a.command)}; {a.rounds} interleaved rounds" +
          (f", pinned to CPU {a.cpu}" if a.cpu is not None else ""))
    print(f"{'variant':<10} {'median s':>9} {'ratio':>7}   all runs")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<10} {m:>9.3f} {m / base:>6.2f}x   {' '.join(f'{t:.3f}' for t in ts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Time the speed/ scripts under each allocator; print median and fastest wall times.

Each (script, allocator) pair runs --runs times, interleaved (every allocator
once per round) to spread machine noise evenly.  Wall time is measured around
the whole child process (interpreter start-up included, ~20 ms).  The ratio
column is median time / median time under pymalloc (CPython's default), so
< 1.00 is faster.  Each script prints a checksum; a checksum that differs
between runs or allocators is reported as a failure.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import allocators

SPEED_DIR = Path(__file__).resolve().parent / "speed"
SCRIPTS = sorted(p.stem for p in SPEED_DIR.glob("*.py") if not p.stem.startswith("_"))


def time_script(script, env, timeout):
    """(wall seconds, checksum output) of one run; raises RuntimeError."""
    start = time.perf_counter()
    out = allocators.run_child([allocators.PYTHON, str(SPEED_DIR / f"{script}.py")], env, timeout)
    return time.perf_counter() - start, out.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", default=",".join(SCRIPTS),
                    help="comma-separated scripts from speed/ (default: %(default)s)")
    ap.add_argument("--allocators", default="all",
                    help="comma-separated allocators or 'all' (%s); reference, not in 'all': %s"
                    % (", ".join(allocators.NAMES), ", ".join(allocators.REFERENCES)))
    ap.add_argument("--runs", type=int, default=5, help="runs per pair (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per run (default: %(default)s)")
    ap.add_argument("--cpu", type=int, metavar="N",
                    help="run every child on CPU N only (os.sched_setaffinity): less noise in an A/B "
                         "of two builds; libebb's purger then shares the CPU with the program")
    ap.add_argument("--json", metavar="FILE", help="also write all times as JSON to FILE ('-': stdout)")
    args = ap.parse_args()

    scripts = [s.strip() for s in args.scripts.split(",") if s.strip()]
    unknown = [s for s in scripts if s not in SCRIPTS]
    if unknown:
        ap.error(f"unknown script(s) {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})  # inherited by every child
        except (OSError, ValueError) as e:
            ap.error(f"--cpu {args.cpu}: {e}")
    # glibc+trim only differs from glibc in the memory scenarios.
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON
    names = [n for n in allocators.split_names(args.allocators) if n != "glibc+trim"]
    chosen = allocators.resolve(names)
    if not chosen:
        sys.exit("no usable allocator")

    times = {(s, a): [] for s in scripts for a, _ in chosen}
    checksums = {s: set() for s in scripts}
    errors = []
    for r in range(1, args.runs + 1):
        for script in scripts:
            for name, env in chosen:
                print(f"run {r}/{args.runs} {script} {name}", file=sys.stderr, flush=True)
                try:
                    wall, checksum = time_script(script, env, args.timeout)
                except RuntimeError as e:
                    errors.append(f"{script}/{name}/run {r}: {e}")
                    print(f"  FAILED: {e}", file=sys.stderr, flush=True)
                    continue
                times[script, name].append(wall)
                checksums[script].add(checksum)
    for script, outs in checksums.items():
        if len(outs) > 1:
            errors.append(f"{script}: checksums differ between runs/allocators: {sorted(outs)}")

    names = [a for a, _ in chosen]
    pinned = f"; pinned to CPU {args.cpu}" if args.cpu is not None else ""
    print(f"Interpreter: {allocators.PYTHON}; runs: {args.runs}{pinned}", file=out)
    for what, pick in (("median", statistics.median), ("fastest", min)):
        print(f"\n{what} wall time in s (ratio vs pymalloc)\n", file=out)
        table(out, scripts, names, {k: pick(v) if v else None for k, v in times.items()})
    allocators.finish(out, errors, args.json,
                      {"runs": args.runs, "times_s": {f"{s}/{a}": v for (s, a), v in times.items()}})


def table(out, scripts, names, secs):
    """One markdown table of times per script and allocator, with ratios to pymalloc."""
    print("| script | " + " | ".join(names) + " |", file=out)
    print("|---|" + "---|" * len(names), file=out)
    for script in scripts:
        ref = secs.get((script, "pymalloc"))
        cells = []
        for name in names:
            t = secs[script, name]
            if t is None:
                cells.append("FAIL")
            elif ref:
                cells.append(f"{t:.2f} ({t / ref:.2f})")
            else:
                cells.append(f"{t:.2f}")
        print(f"| {script} | " + " | ".join(cells) + " |", file=out)
    if "pymalloc" in names:
        geo = []
        for name in names:
            ratios = [secs[s, name] / secs[s, "pymalloc"] for s in scripts
                      if secs[s, name] and secs[s, "pymalloc"]]
            geo.append(f"{statistics.geometric_mean(ratios):.2f}" if ratios else "FAIL")
        print("| geomean ratio | " + " | ".join(geo) + " |", file=out)


if __name__ == "__main__":
    main()

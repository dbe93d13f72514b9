#!/usr/bin/python3
"""Run the ebb_micro_bench binary under each allocator (LD_PRELOAD).

Prints a markdown table of ns per operation (one malloc+free pair), computed
as 1e9 / items_per_second from Google Benchmark's JSON output; with --runs N
the allocators are run interleaved N times and the median is shown.  The
binary defaults to <repo>/build/bin/ebb_micro_bench.  pymalloc and
glibc+trim are Python-only variants and mean plain glibc here, so the default
set is the preloadable allocators plus glibc.  Arguments after `--` go to the
benchmark binary unchanged.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import allocators

DEFAULT_BINARY = allocators.BENCH_DIR.parent / "build" / "bin" / "ebb_micro_bench"
DEFAULT_ALLOCATORS = "ebb,glibc,jemalloc,jemalloc-decay0,mimalloc,tcmalloc"


def run_binary(binary, env, extra, timeout):
    """{benchmark name: ns/op} of one run of the binary; raises RuntimeError."""
    out = allocators.run_child([str(binary), "--benchmark_format=json", *extra], env, timeout)
    try:
        data = json.loads(out)
    except ValueError:
        raise RuntimeError(f"output is not JSON: {out[:200]!r}")
    result = {}
    for b in data.get("benchmarks", []):
        if b.get("run_type", "iteration") != "iteration" or not b.get("items_per_second"):
            continue
        result[b["name"]] = 1e9 / b["items_per_second"]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?", type=Path, default=DEFAULT_BINARY,
                    help="path of ebb_micro_bench (default: %(default)s)")
    ap.add_argument("--allocators", default=DEFAULT_ALLOCATORS,
                    help="comma-separated allocators (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs (default: %(default)s)")
    ap.add_argument("--min-time", type=float,
                    help="seconds per benchmark, passed as --benchmark_min_time")
    ap.add_argument("--filter", help="regex, passed as --benchmark_filter")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run (default: %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="also write all ns/op figures as JSON to FILE ('-': stdout)")
    args, extra = ap.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    elif extra:
        ap.error(f"unrecognized arguments {' '.join(extra)} (put benchmark options after --)")
    if not args.binary.is_file():
        sys.exit(f"benchmark binary {args.binary} not found: build the ebb_micro_bench "
                 "target or pass its path")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.min_time is not None:
        extra.append(f"--benchmark_min_time={args.min_time}")
    if args.filter:
        extra.append(f"--benchmark_filter={args.filter}")

    chosen = [(name, {k: v for k, v in env.items() if k != "PYTHONMALLOC"})
              for name, env in allocators.resolve(allocators.split_names(args.allocators))]
    if not chosen:
        sys.exit("no usable allocator")
    samples = {name: {} for name, _ in chosen}
    order = []
    errors = []
    for r in range(1, args.runs + 1):
        for name, env in chosen:
            print(f"run {r}/{args.runs} {name}", file=sys.stderr, flush=True)
            try:
                result = run_binary(args.binary, env, extra, args.timeout)
            except RuntimeError as e:
                errors.append(f"{name}/run {r}: {e}")
                print(f"  FAILED: {e}", file=sys.stderr, flush=True)
                continue
            for bench, ns in result.items():
                samples[name].setdefault(bench, []).append(ns)
                if bench not in order:
                    order.append(bench)

    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON
    names = [n for n, _ in chosen]
    print(f"Binary: {args.binary}; runs: {args.runs}; median ns per malloc+free pair\n", file=out)
    print("| benchmark | " + " | ".join(names) + " |", file=out)
    print("|---|" + "---|" * len(names), file=out)
    for bench in order:
        cells = [f"{statistics.median(v):.1f}" if (v := samples[n].get(bench)) else "FAIL"
                 for n in names]
        print(f"| {bench} | " + " | ".join(cells) + " |", file=out)
    allocators.finish(out, errors, args.json, {"runs": args.runs, "ns_per_op": samples})


if __name__ == "__main__":
    main()

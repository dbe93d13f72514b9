#!/usr/bin/python3
"""Run the memory scenarios under each allocator; print median RSS in MB.

Each (scenario, allocator) pair runs --runs times, interleaved (round 1: every
allocator once, round 2: again, ...) so slow drifts of the machine hit all
allocators alike.  Figures are medians over runs of VmRSS (/proc/self/status)
right after the build, right after `del`, at each idle checkpoint, and the
peak (max of VmHWM and the samples).  The base RSS of an interpreter that
does nothing but read its own VmRSS is measured under each allocator as well,
so targets like "frag after idle <= base + 5 MB" can be judged.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import allocators

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
SCENARIOS = sorted(p.stem for p in SCENARIO_DIR.glob("*.py") if not p.stem.startswith("_"))
BASE_CODE = ("for l in open('/proc/self/status'):\n"
             "    if l.startswith('VmRSS:'): print(l.split()[1])")


def run_scenario(scenario, env, idle, timeout):
    script = str(SCENARIO_DIR / f"{scenario}.py")
    out = allocators.run_child([allocators.PYTHON, script, "--idle", idle], env, timeout)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"no JSON line in output: {out[-200:]!r}")


def base_rss(env, timeout):
    return int(allocators.run_child([allocators.PYTHON, "-c", BASE_CODE], env, timeout).split()[0])


def mb(kb):
    return None if kb is None else kb / 1024


def median(values):
    return statistics.median(values) if values else None


def summarize(samples, bases):
    """Medians (MB) of one (scenario, allocator) cell."""
    if not samples:
        return None
    points = [p for p, _ in samples[0]["idle"]]
    cell = {
        "runs": len(samples),
        "build": mb(median([s["build_kb"] for s in samples])),
        "del": mb(median([s["del_kb"] for s in samples])),
        "idle": [[p, mb(median([s["idle"][i][1] for s in samples]))]
                 for i, p in enumerate(points)],
        "peak": mb(median([s["peak_kb"] for s in samples])),
        "base": mb(median(bases)),
    }
    last = cell["idle"][-1][1] if cell["idle"] else cell["del"]
    cell["over_base"] = None if cell["base"] is None else last - cell["base"]
    return cell


def fmt(x):
    return "FAIL" if x is None else f"{x:.1f}"


def table(scenario, names, cells, idle_points):
    idle_cols = [f"after {p:g}s" for p in idle_points]
    head = ["allocator", "build", "after del", *idle_cols, "peak", "base", "last - base"]
    lines = [f"### {scenario} (median RSS, MB)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        c = cells.get(name)
        if c is None:
            row = [name] + ["FAIL"] * (len(head) - 1)
        else:
            row = [name, fmt(c["build"]), fmt(c["del"]), *(fmt(v) for _, v in c["idle"]),
                   fmt(c["peak"]), fmt(c["base"]), fmt(c["over_base"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated scenarios (default: %(default)s)")
    ap.add_argument("--allocators", default="all",
                    help="comma-separated allocators or 'all' (%s)" % ", ".join(allocators.NAMES))
    ap.add_argument("--runs", type=int, default=3, help="runs per pair (default: %(default)s)")
    ap.add_argument("--idle", default="1,12",
                    help="cumulative idle checkpoints in seconds after del (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (default: %(default)s)")
    ap.add_argument("--json", metavar="FILE",
                    help="also write every sample and the medians as JSON to FILE ('-': stdout)")
    args = ap.parse_args()

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    try:
        idle_points = [float(x) for x in args.idle.split(",") if x.strip()]
    except ValueError:
        idle_points = []
    if not idle_points or idle_points != sorted(idle_points) or idle_points[0] < 0:
        ap.error(f"--idle must be ascending seconds >= 0, e.g. 1,12 (got {args.idle!r})")
    names = allocators.split_names(args.allocators)
    for name in set(names) & set(allocators.REFERENCES):  # never gives memory back: no figure to compare
        print(f"skipping allocator {name}: a speed reference only", file=sys.stderr)
    chosen = allocators.resolve([n for n in names if n not in allocators.REFERENCES])
    if not chosen:
        sys.exit("no usable allocator")

    samples = {(s, a): [] for s in scenarios for a, _ in chosen}
    bases = {a: [] for a, _ in chosen}
    errors = []
    for r in range(1, args.runs + 1):
        for name, env in chosen:
            try:
                bases[name].append(base_rss(env, args.timeout))
            except RuntimeError as e:
                errors.append(f"base/{name}/run {r}: {e}")
        for scenario in scenarios:
            for name, env in chosen:
                print(f"run {r}/{args.runs} {scenario} {name}", file=sys.stderr, flush=True)
                try:
                    samples[scenario, name].append(
                        run_scenario(scenario, env, args.idle, args.timeout))
                except RuntimeError as e:
                    errors.append(f"{scenario}/{name}/run {r}: {e}")
                    print(f"  FAILED: {e}", file=sys.stderr, flush=True)

    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON
    names = [a for a, _ in chosen]
    summary = {s: {a: summarize(samples[s, a], bases[a]) for a in names} for s in scenarios}
    print(f"Interpreter: {allocators.PYTHON}; runs: {args.runs}; idle checkpoints: {args.idle} s\n", file=out)
    print("Base RSS (interpreter that only reads its VmRSS), median MB: " +
          ", ".join(f"{a} {fmt(mb(median(bases[a])))}" for a in names) + "\n", file=out)
    for s in scenarios:
        print(table(s, names, {a: c for a, c in summary[s].items() if c}, idle_points) + "\n", file=out)
    allocators.finish(out, errors, args.json,
                      {"runs": args.runs, "idle": idle_points, "summary_mb": summary, "base_kb": bases,
                       "samples_kb": {f"{s}/{a}": v for (s, a), v in samples.items()}})


if __name__ == "__main__":
    main()

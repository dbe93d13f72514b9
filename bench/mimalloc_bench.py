#!/usr/bin/python3
"""ebb and its peers on programs of mimalloc-bench, a public allocator suite.

The suite is not part of ebb: fetch it (https://github.com/daanx/mimalloc-bench)
and give its checkout's path.  This script builds the suite's `bench/`
directory with its own CMakeLists (into --build), then runs each program
under each allocator, round after round, the allocators interleaved within
a round, pinned to the CPUs of --cpu.  Per run it reads wall time, user and
system time and minor page faults (wait4's rusage), and peak RSS (VmHWM, polled every 2 ms), and for larson and xmalloc-test
the throughput they print.  It prints one JSON line per run and a markdown
table of medians, with each allocator's ratio to the first one named.

    git clone https://github.com/daanx/mimalloc-bench /tmp/mimalloc-bench
    /usr/bin/python3 bench/mimalloc_bench.py --suite /tmp/mimalloc-bench \\
        --programs malloc-large,cfrac --rounds 5 --cpu 0,1

Command lines are the suite's own (its bench.sh), with 2 threads where a
program takes a count (`--threads`).  Allocators are named as in
allocators.py (`ebb@/path/libebb.so` compares another build).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocators import resolve  # noqa: E402
from procs import proc_kb  # noqa: E402

# program -> (binary, arguments; {t} is the thread count, {suite} the checkout)
PROGRAMS = {
    "malloc-large": ("malloc-large", []),
    "cfrac": ("cfrac", ["17545186520507317056371138836327483792789528"]),
    "larson": ("larson", ["5", "8", "1000", "5000", "100", "4141", "{t}"]),
    "alloc-test": ("alloc-test", ["1"]),
    "xmalloc-test": ("xmalloc-test", ["-w", "{t}", "-t", "5", "-s", "64"]),
    "espresso": ("espresso", ["{suite}/bench/espresso/largest.espresso"]),
    "barnes": ("barnes", []),
    "mstress": ("mstress", ["{t}", "50", "25"]),
    "cache-scratch": ("cache-scratch", ["1", "1000", "1", "2000000", "{t}"]),
}
# What a program prints as its throughput (higher is better), if anything.
THROUGHPUT = {
    "larson": re.compile(r"Throughput\s*=\s*([\d.]+)"),
    "xmalloc-test": re.compile(r"rtime:\s*[\d.]+,\s*free/sec:\s*([\d.]+)"),
}
STDIN = {"barnes": "{suite}/bench/barnes/input"}


def source_dir(suite, out):
    """The suite's bench/ directory, or, when some of its programs' sources are
    missing (shbench's are downloaded by the suite's build-bench-env.sh, which
    needs the network), a copy in `out` of its CMakeLists.txt without those
    programs, next to links to the rest."""
    bench = suite / "bench"
    lines = (bench / "CMakeLists.txt").read_text().splitlines()
    missing = set()
    for line in lines:
        m = re.match(r"\s*add_executable\((\S+)\s+([^)]*)\)", line)
        if m and not all((bench / f).exists() for f in m.group(2).split() if "$" not in f):
            missing.add(m.group(1))
    if not missing:
        return bench
    print(f"not built (sources missing): {', '.join(sorted(missing))}", file=sys.stderr)
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    for entry in bench.iterdir():
        link = src / entry.name
        if entry.name != "CMakeLists.txt" and not link.exists():
            link.symlink_to(entry)
    target = re.compile(r"\s*(add_executable|target_\w+)\((\S+)")
    kept = [l for l in lines if not ((m := target.match(l)) and m.group(2) in missing)]
    (src / "CMakeLists.txt").write_text("\n".join(kept) + "\n")
    return src


def build(suite, out):
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "build.ninja").exists():
        subprocess.run(["cmake", "-S", str(source_dir(suite, out)), "-B", str(out), "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", str(out)], check=True, stdout=subprocess.DEVNULL)


def run_once(cmd, env, cpus, stdin_path, timeout):
    """(wall s, rusage, output) of one run. wait4 gives this child's own
    rusage (peak RSS included), polled every 2 ms so the wall time is its own too."""
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]  # taskset execs the program: same pid, same rusage
    with tempfile.TemporaryFile("w+") as out, open(stdin_path or os.devnull) as stdin:
        start = time.monotonic()
        p = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=out, stderr=subprocess.STDOUT)
        hwm = 0  # VmHWM: ru_maxrss also holds the harness's own peak (vfork before exec)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, vm_hwm_kb(p.pid))
            if time.monotonic() - start > timeout:
                p.kill()
                os.wait4(p.pid, 0)
                raise RuntimeError(f"timed out after {timeout} s")
            time.sleep(0.002)
        wall = time.monotonic() - start
        p.returncode = 0  # reaped here, not by Popen
        out.seek(0)
        text = out.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"exit status {code}: {text.strip()[-300:]}")
    return wall, usage, text, hwm


def vm_hwm_kb(pid):
    return proc_kb(pid, "status", "VmHWM:")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=Path, required=True, help="checkout of github.com/daanx/mimalloc-bench")
    ap.add_argument("--build", type=Path, default=Path("/tmp/ebb-mimalloc-bench-build"),
                    help="where to build its bench/ (default: %(default)s)")
    ap.add_argument("--programs", default="malloc-large,cfrac,larson,alloc-test,xmalloc-test",
                    help=f"comma-separated, of: {', '.join(PROGRAMS)} (default: %(default)s)")
    ap.add_argument("--allocators", default="ebb,glibc,jemalloc,mimalloc,tcmalloc", help="(default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each program per allocator (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="for programs that take a count (default: 2)")
    ap.add_argument("--cpu", default="", help="taskset CPU list, e.g. 0,1 (default: not pinned)")
    ap.add_argument("--timeout", type=float, default=300, help="per run, seconds (default: 300)")
    ap.add_argument("--markdown", type=Path, help="also write the table of medians here")
    a = ap.parse_args()
    if not (a.suite / "bench" / "CMakeLists.txt").is_file():
        sys.exit(f"mimalloc_bench.py: {a.suite} is not a mimalloc-bench checkout (no bench/CMakeLists.txt)")
    programs = a.programs.split(",")
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        sys.exit(f"mimalloc_bench.py: unknown program(s) {', '.join(unknown)}; known: {', '.join(PROGRAMS)}")
    allocators = resolve(a.allocators.split(","))
    if not allocators:
        sys.exit("mimalloc_bench.py: no usable allocator")
    build(a.suite, a.build)
    fields = {"suite": str(a.suite), "t": str(a.threads)}
    results = {}  # (program, allocator) -> [run]
    for rnd in range(a.rounds):
        for prog in programs:
            binary, args = PROGRAMS[prog]
            cmd = [str(a.build / binary), *(x.format(**fields) for x in args)]
            stdin = STDIN.get(prog, "").format(**fields) or None
            order = allocators if rnd % 2 == 0 else allocators[::-1]  # interleaved, alternating order
            for name, env in order:
                try:
                    wall, usage, out, hwm = run_once(cmd, env, a.cpu, stdin, a.timeout)
                except RuntimeError as e:
                    print(json.dumps({"program": prog, "allocator": name, "round": rnd, "error": str(e)}), flush=True)
                    continue
                run = {"program": prog, "allocator": name, "round": rnd, "wall_s": round(wall, 3),
                       "user_s": round(usage.ru_utime, 3), "sys_s": round(usage.ru_stime, 3),
                       "peak_rss_mb": round(hwm / 1024, 1), "faults": usage.ru_minflt}
                m = THROUGHPUT.get(prog) and THROUGHPUT[prog].search(out)
                if m:
                    run["throughput"] = float(m.group(1))
                print(json.dumps(run), flush=True)
                results.setdefault((prog, name), []).append(run)
    table = markdown(programs, [n for n, _ in allocators], results)
    print(table)
    if a.markdown:
        a.markdown.write_text(table)


def markdown(programs, names, results):
    lines = [f"| program | allocator | runs | wall s (median) | vs {names[0]} | user s | sys s | page faults | peak RSS MB |"
             " throughput (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for prog in programs:
        base = results.get((prog, names[0]))
        base_wall = statistics.median(r["wall_s"] for r in base) if base else None
        for name in names:
            runs = results.get((prog, name))
            if not runs:
                lines.append(f"| {prog} | {name} | 0 | failed | | | | | |")
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "user_s", "sys_s", "faults",
                                                                          "peak_rss_mb")}
            tp = [r["throughput"] for r in runs if "throughput" in r]
            ratio = f"{med['wall_s'] / base_wall:.2f}x" if base_wall else ""
            lines.append(f"| {prog} | {name} | {len(runs)} | {med['wall_s']:.2f} | {ratio} | {med['user_s']:.2f} | "
                         f"{med['sys_s']:.2f} | {med['faults']:,.0f} | {med['peak_rss_mb']:.0f} | "
                         f"{f'{statistics.median(tp):,.0f}' if tp else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

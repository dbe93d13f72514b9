"""Helpers shared by the memory scenarios: RSS sampling, idle phases, JSON.

RSS is VmRSS and peak is VmHWM, both read from /proc/self/status (kB).
The kernel updates VmHWM lazily, so the reported peak is the larger of VmHWM
and the highest VmRSS sample taken.
Idle checkpoints are cumulative seconds after the `del`, e.g. "1,12" samples
RSS 1 s and 12 s after the del.  They come from --idle or env EBB_BENCH_IDLE.
During idle the process only sleeps: nothing allocates, so any drop in RSS is
the allocator's own doing (background thread, timer, signal...).
"""
import argparse
import json
import os
import sys
import time

DEFAULT_IDLE = "1,12"


def status_kb(field):
    """Return a kB field (VmRSS, VmHWM, ...) of /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def parse_idle(text):
    points = [float(x) for x in text.split(",") if x.strip()]
    if not points or any(b < a for a, b in zip(points, points[1:])) or points[0] < 0:
        raise ValueError(f"idle checkpoints must be ascending seconds >= 0, got {text!r}")
    return points


def setup(description):
    """Parse the command line; return (idle checkpoints, trim function).

    The trim function calls glibc's malloc_trim(0) when EBB_BENCH_TRIM=1 and
    does nothing otherwise.  ctypes is loaded here, before the build phase, so
    loading it does not disturb the after-del sample.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--idle", default=os.environ.get("EBB_BENCH_IDLE", DEFAULT_IDLE),
                   help="comma-separated cumulative idle checkpoints in seconds "
                        "(default: env EBB_BENCH_IDLE or %(default)s)")
    args = p.parse_args()
    try:
        idle = parse_idle(args.idle)
    except ValueError as e:
        p.error(str(e))
    if os.environ.get("EBB_BENCH_TRIM") == "1":
        import ctypes
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        malloc_trim.argtypes = [ctypes.c_size_t]
        return idle, lambda: malloc_trim(0)
    return idle, lambda: None


def finish(scenario, build_kb, del_kb, idle):
    """Sleep through the idle checkpoints, then print one JSON line."""
    samples = []
    slept = 0.0
    for point in idle:
        time.sleep(point - slept)
        slept = point
        samples.append([point, status_kb("VmRSS")])
    print(json.dumps({
        "scenario": scenario,
        "trim": os.environ.get("EBB_BENCH_TRIM") == "1",
        "build_kb": build_kb,
        "del_kb": del_kb,
        "idle": samples,  # [[seconds after del, VmRSS kB], ...]
        "peak_kb": max(status_kb("VmHWM"), build_kb, del_kb,
                       *(kb for _, kb in samples)),
    }))
    sys.stdout.flush()

#!/usr/bin/python3
"""A small worker for `ebb run` tests: leaks, churns and stops on demand.

Each second it runs one "task": keeps --leak MB more (a leak), and builds
and drops --churn MB of small objects (garbage that stays resident until
the allocator purges it).  On SIGTERM it finishes the task in progress and
exits 0, unless --ignore-term.  Prints one line per event to stdout:
"start PID", "task N", "stop PID".
"""
import argparse
import os
import signal
import sys
import time

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--leak", type=float, default=0, help="MB kept per task")
p.add_argument("--leak-per-id", type=float, default=0,
               help="MB kept per task times the worker's EBB_WORKER_ID")
p.add_argument("--churn", type=float, default=0, help="MB allocated and freed per task")
p.add_argument("--churn-once", type=float, default=0,
               help="MB allocated and freed once, at start (then the worker idles)")
p.add_argument("--task", type=float, default=0.2, help="seconds per task")
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--exit-after", type=float, default=0, help="exit by itself after this many seconds")
p.add_argument("--exit-code", type=int, default=0)
args = p.parse_args()
if args.leak_per_id:
    args.leak = args.leak_per_id * int(os.environ.get("EBB_WORKER_ID", "1"))

stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else on_term)
print("start", os.getpid(), os.environ.get("EBB_WORKER_ID", "?"), flush=True)
kept = []
if args.churn_once:
    garbage = [str(i) * 10 for i in range(int(args.churn_once * 1e6 / 90))]
    del garbage
started = time.monotonic()
n = 0
while not stopping:
    if args.exit_after and time.monotonic() - started >= args.exit_after:
        sys.exit(args.exit_code)
    n += 1
    if args.leak:
        kept.append([str(i) * 10 for i in range(int(args.leak * 1e6 / 90))])
    if args.churn:
        garbage = [str(i) * 10 for i in range(int(args.churn * 1e6 / 90))]
        del garbage
    time.sleep(args.task)
    print("task", n, flush=True)
print("stop", os.getpid(), flush=True)

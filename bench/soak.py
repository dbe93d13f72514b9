#!/usr/bin/python3
"""Soak: an RQ fleet inside a memory budget, with and without ebb run.

Two fleets of N rq workers run side by side for --seconds, each in a cgroup
of its own limited to --limit (cgroup v1 memory or v2), on queues fed at the
same rate with jobs that keep their 0.4 MB argument (seed 002's leak):

  plain: N x `rq worker` (rq.worker.SimpleWorker, CPython's allocator),
         each restarted by a shell loop when it dies, as supervisord or
         systemd would do;
  ebb:   `ebb run -w N --hard-limit H -- rq worker --worker-class
         ebb.rq.SimpleWorker`; its fleet budget comes from the cgroup.

Reports per fleet: OOM kills (the cgroup's counter), jobs enqueued, done,
failed, still queued and lost (enqueued - done - failed - queued - one in
progress per worker), throughput, and the cgroup's memory over time (SVG).
Needs root (it creates cgroups) and redis-server. Not part of `make test`.

    sudo /usr/bin/python3 bench/soak.py --ebb build/bin/ebb --seconds 180
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(REPO, "tests", "integration", "apps")
PY = "/usr/bin/python3"


def cgroup_base():
    """(directory to create child cgroups in, v2?) for this process."""
    with open("/proc/self/cgroup") as f:
        lines = [l.strip().split(":", 2) for l in f]
    for hid, ctrls, path in lines:
        if "memory" in ctrls.split(","):
            return "/sys/fs/cgroup/memory" + (path if path != "/" else ""), False
    for hid, ctrls, path in lines:
        if hid == "0":
            return "/sys/fs/cgroup" + (path if path != "/" else ""), True
    sys.exit("no memory cgroup found")


class Cgroup:
    def __init__(self, name, limit):
        base, self.v2 = cgroup_base()
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir, exist_ok=True)
        self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit))
        if not self.v2:
            try:
                self._write("memory.memsw.limit_in_bytes", str(limit))  # no escape to swap
            except OSError:
                pass

    def _write(self, name, value):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def _read(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def usage(self):
        return int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))

    def oom_kills(self):
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        for line in text.splitlines():
            k, v = line.split()
            if k == "oom_kill":
                return int(v)
        return 0

    def enter_cmd(self, cmd):
        """cmd, run inside this cgroup."""
        procs = os.path.join(self.dir, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.dir)
                return
            except OSError:
                time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ebb", required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--limit", default="400M", help="each fleet's cgroup memory limit (default 400M)")
    ap.add_argument("--hard-limit", default="80M", help="ebb's per-worker hard limit (default 80M)")
    ap.add_argument("--rate", type=float, default=30, help="jobs per second per fleet (default 30)")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "soak"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak: needs root to create cgroups")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    limit = int(float(args.limit[:-1]) * units[args.limit[-1].upper()]) if args.limit[-1].isalpha() else int(args.limit)
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, APPS)
    sys.path.insert(0, os.path.join(REPO, "python"))
    import redis
    from rq import Queue

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="ebb-soak-")
    redis_proc = subprocess.Popen(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC")}
    env.update(EBB_TEST_REDIS=url, PYTHONPATH=os.path.join(REPO, "python"))
    fleets = {}
    procs = []
    for name in ("plain", "ebb"):
        cg = Cgroup(f"ebb-soak-{name}", limit)
        worker = [PY, "/usr/bin/rq", "worker", "--url", url, "--path", APPS, "--quiet", name]
        if name == "plain":
            # A restart loop per worker, as supervisord/systemd would run.
            loop = ["/bin/sh", "-c", 'while true; do "$@"; sleep 0.5; done', "sh",
                    *worker, "--worker-class", "rq.worker.SimpleWorker"]
            ps = [subprocess.Popen(cg.enter_cmd(loop), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for _ in range(args.workers)]
        else:
            cmd = [args.ebb, "run", "-w", str(args.workers), "--hard-limit", args.hard_limit, "--metric", "rss",
                   "--grace", "30s", "--log-format", "json", "--", *worker, "--worker-class", "ebb.rq.SimpleWorker"]
            log = open(os.path.join(args.out, "ebb-run.log"), "w")
            ps = [subprocess.Popen(cg.enter_cmd(cmd), env=env, stdout=subprocess.DEVNULL, stderr=log)]
        procs += ps
        fleets[name] = {"cgroup": cg, "procs": ps, "queue": Queue(name, connection=r), "enqueued": 0,
                        "samples": []}
    payload = "x" * 400_000
    start = time.monotonic()
    n = 0
    try:
        while (t := time.monotonic() - start) < args.seconds:
            while n < t * args.rate:  # the same jobs, at the same rate, for both fleets
                for name, f in fleets.items():
                    f["queue"].enqueue("rq_jobs.work", f"{name}:{n}", payload, result_ttl=0)
                    f["enqueued"] += 1
                n += 1
            for f in fleets.values():
                f["samples"].append((t, f["cgroup"].usage() // 1024))
            time.sleep(0.5)
    finally:
        for f in fleets.values():  # every process of both fleets, restart loops included
            subprocess.run(["/bin/sh", "-c", f"kill -TERM $(cat {f['cgroup'].dir}/cgroup.procs) 2>/dev/null"])
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for f in fleets.values():
            subprocess.run(["/bin/sh", "-c", f"kill -KILL $(cat {f['cgroup'].dir}/cgroup.procs) 2>/dev/null"])
        for p in procs:
            p.wait(timeout=30)
    elapsed = time.monotonic() - start
    done = [x.decode() for x in r.lrange("done", 0, -1)]
    results = {"seconds": round(elapsed), "workers": args.workers, "limit": args.limit, "rate": args.rate}
    for name, f in fleets.items():
        got = sum(1 for x in done if x.startswith(name + ":"))
        queued = len(f["queue"])
        samples = [kb for _, kb in f["samples"]]
        results[name] = {
            "oom_kills": f["cgroup"].oom_kills(),
            "enqueued": f["enqueued"],
            "done": got,
            "duplicates": got - len({x for x in done if x.startswith(name + ":")}),
            "still_queued": queued,
            "lost_or_failed": f["enqueued"] - len({x for x in done if x.startswith(name + ":")}) - queued,
            "jobs_per_s": round(got / elapsed, 1),
            "mean_mb": round(sum(samples) / len(samples) / 1024, 1),
            "peak_mb": round(max(samples) / 1024, 1),
        }
    redis_proc.terminate()
    redis_proc.wait()
    for f in fleets.values():
        f["cgroup"].remove()
    shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from fleet_demo import svg_chart
    series = [(a[0], a[1], b[1]) for a, b in zip(fleets["plain"]["samples"], fleets["ebb"]["samples"])]
    svg_chart(series, os.path.join(args.out, "soak.svg"), title=f"cgroup memory (MB), limit {args.limit} each",
              names=("plain fleet", "ebb run fleet"))
    with open(os.path.join(args.out, "soak.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))
    print(f"chart: {os.path.join(args.out, 'soak.svg')}")


if __name__ == "__main__":
    main()

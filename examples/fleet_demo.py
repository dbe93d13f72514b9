#!/usr/bin/python3
"""`make demo`: the same worker fleet with and without ebb, side by side.

Starts two fleets of examples/fleet_worker.py at the same time, with the
same tasks: a plain one (N processes, CPython's default allocator, no
supervisor) and one under `ebb run` (libebb, soft and hard limits). Samples
the PSS of both fleets every half second, then stops both gracefully and
prints what each held and what each got done.

    /usr/bin/python3 examples/fleet_demo.py --ebb build/bin/ebb
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fleet_worker.py")
PY = "/usr/bin/python3"


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root):
    """root and every process below it, from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def mb(kb):
    return f"{kb / 1024:.1f}M"


def svg_chart(samples, path, title="Fleet PSS (MB) over time: plain vs ebb run", names=("plain", "ebb run")):
    """Two series over time (samples: (t, a kB, b kB)), as a small self-contained SVG."""
    w, h, left, bottom, top, right = 720, 360, 60, 40, 30, 20
    t_max = max(s[0] for s in samples) or 1
    y_max = max(max(s[1], s[2]) for s in samples) / 1024 or 1
    step = next(x for x in (10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000) if y_max / x <= 8)
    y_top = step * (int(y_max // step) + 1)
    sx = lambda t: left + (w - left - right) * t / t_max  # noqa: E731
    sy = lambda mb_: h - bottom - (h - bottom - top) * mb_ / y_top  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">{title}</text>']
    for i in range(int(y_top // step) + 1):
        y = sy(i * step)
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step}</text>')
    for t in range(0, int(t_max) + 1, 10 if t_max <= 60 else 30 if t_max <= 300 else 60):
        out.append(f'<text x="{sx(t):.1f}" y="{h - bottom + 16}" text-anchor="middle">{t} s</text>')
    for i, (name, color) in enumerate(zip(names, ("#d62728", "#1f77b4"))):
        pts = " ".join(f"{sx(s[0]):.1f},{sy(s[i + 1] / 1024):.1f}" for s in samples)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        out.append(f'<rect x="{w - right - 110}" y="{top + 4 + 18 * i}" width="14" height="4" fill="{color}"/>'
                   f'<text x="{w - right - 90}" y="{top + 10 + 18 * i}">{name}</text>')
    out.append("</svg>\n")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ebb", required=True, help="the ebb binary")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--soft-limit", default="40M")
    ap.add_argument("--hard-limit", default="60M")
    ap.add_argument("--leak-kb", type=int, default=300, help="the workers' leak per task (default: 300 KB)")
    ap.add_argument("--out", default=None, help="directory for the log and samples (default: a temporary one)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ebb-demo-")
    os.makedirs(out, exist_ok=True)
    dirs = {name: os.path.join(out, name) for name in ("plain", "ebb")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
        for f in glob.glob(os.path.join(d, "done-*")):
            os.remove(f)
    sock = os.path.join(out, "fleet.sock")
    base_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC", "FLEET_SEED")}
    base_env["FLEET_LEAK_KB"] = str(args.leak_kb)

    ebb_cmd = [args.ebb, "run", "-w", str(args.workers), "--hard-limit", args.hard_limit, "--grace", "20s",
               "--interval", "0.5s", "--status-socket", sock]
    if args.soft_limit != "none":
        ebb_cmd += ["--soft-limit", args.soft_limit]
    ebb_cmd += ["--", PY, WORKER]
    print(f"ebb demo: {args.workers} workers of examples/fleet_worker.py (bursts of JSON tasks, a leak of "
          f"{args.leak_kb} KB per task), twice, for {args.seconds:.0f} s, with the same tasks:")
    print(f"  plain: {args.workers} x python3 fleet_worker.py   (CPython's allocator, no supervisor)")
    print(f"  ebb:   {' '.join(ebb_cmd[1:-2])} python3 fleet_worker.py")
    log = open(os.path.join(out, "ebb-run.log"), "w")
    # Both fleets stay in this session: with the kernel's autogroup
    # scheduling, a process in a session of its own would get as much CPU as
    # a whole fleet.
    plain = [subprocess.Popen([PY, WORKER], env={**base_env, "FLEET_DIR": dirs["plain"], "FLEET_SEED": str(i + 1)},
                              stdout=subprocess.DEVNULL) for i in range(args.workers)]
    fleet = subprocess.Popen(ebb_cmd, env={**base_env, "FLEET_DIR": dirs["ebb"]}, stdout=subprocess.DEVNULL,
                             stderr=log)
    samples = []  # (t, plain kB, ebb kB)
    start = time.monotonic()
    next_print = 5
    try:
        while (t := time.monotonic() - start) < args.seconds:
            p_kb = sum(pss_kb(p.pid) for p in plain)
            e_kb = sum(pss_kb(pid) for pid in descendants(fleet.pid))
            samples.append((t, p_kb, e_kb))
            if t >= next_print:
                print(f"  {t:4.0f} s   plain {mb(p_kb):>8}   ebb {mb(e_kb):>8}", flush=True)
                next_print += 5
            if fleet.poll() is not None:
                sys.exit(f"ebb run exited early; see {log.name}")
            time.sleep(0.5)
        print()
        subprocess.run([args.ebb, "ps", "--fleet", sock], check=False)
    finally:
        for p in plain:
            p.send_signal(signal.SIGTERM)
        fleet.send_signal(signal.SIGTERM)
        for p in plain:
            p.wait(timeout=60)
        code = fleet.wait(timeout=60)
        log.close()

    def stats(i):
        vals = [s[i] for s in samples]
        area = sum(v * (b[0] - a[0]) for v, a, b in zip(vals, samples, samples[1:])) / 1024 / 1024  # GB*s
        return {"mean": sum(vals) / len(vals), "peak": max(vals), "final": vals[-1], "gb_s": area}

    def tasks(d):
        return sum(int(open(f).read() or 0) for f in glob.glob(os.path.join(d, "done-*")))

    p, e = stats(1), stats(2)
    tp, te = tasks(dirs["plain"]), tasks(dirs["ebb"])
    with open(os.path.join(out, "ebb-run.log")) as f:
        events = f.read()
    recycles, trims = events.count(" recycle ("), events.count(" trim (")
    print(f"\n{'fleet PSS':<18}{'plain':>10}{'ebb':>10}{'saved':>8}")
    for key, label in (("mean", "mean"), ("peak", "peak"), ("final", "at the end")):
        saved = 100 * (1 - e[key] / p[key]) if p[key] else 0
        print(f"{label:<18}{mb(p[key]):>10}{mb(e[key]):>10}{saved:>7.0f}%")
    print(f"{'GB*s':<18}{p['gb_s']:>10.2f}{e['gb_s']:>10.2f}{100 * (1 - e['gb_s'] / p['gb_s']):>7.0f}%")
    print(f"{'tasks done':<18}{tp:>10}{te:>10}")
    print(f"\nebb run: {recycles} recycles, {trims} trims, exit status {code}; log {log.name}")
    svg_chart(samples, os.path.join(out, "fleet.svg"))
    print(f"chart: {os.path.join(out, 'fleet.svg')}")
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump({"t": [s[0] for s in samples], "plain_kb": [s[1] for s in samples],
                   "ebb_kb": [s[2] for s in samples]}, f)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

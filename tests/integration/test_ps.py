"""ebb ps against /proc, read here independently of ebb's own reader."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

PY = "/usr/bin/python3"


@pytest.fixture
def sleeper():
    """A process holding ~40 MB of private memory and a child, idle."""
    code = ("import os, sys, time\n"
            "data = bytearray(40 * 1024 * 1024)\n"
            "for i in range(0, len(data), 4096): data[i] = 1\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    time.sleep(60); os._exit(0)\n"
            "print(child, flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    time.sleep(0.2)
    yield p.pid, child
    for pid in (child, p.pid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    p.wait(timeout=10)


def rollup(pid):
    """(rss, pss, uss, shared) in bytes, read straight from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024
    return (fields["Rss"], fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"],
            fields["Shared_Clean"] + fields["Shared_Dirty"])


def ebb(ebb_bin, *args):
    return subprocess.run([ebb_bin, *args], capture_output=True, text=True, timeout=60)


def test_json_figures_match_smaps_rollup(ebb_bin, sleeper):
    parent, _ = sleeper
    before = rollup(parent)
    out = ebb(ebb_bin, "ps", "--json", str(parent))
    after = rollup(parent)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["processes"]
    assert [r["pid"] for r in rows] == [parent]
    row = rows[0]
    assert row["state"] == "ok"
    assert row["command"].startswith(PY + " -c")
    for i, key in enumerate(["rss", "pss", "uss", "shared"]):
        # An idle process: the figures may move by a few pages between reads.
        # PSS also moves when other processes that share its pages (the
        # interpreter's) start or exit, so it gets more room.
        slack = (512 if key == "pss" else 64) * 1024
        lo, hi = min(before[i], after[i]), max(before[i], after[i])
        assert lo - slack <= row[key] <= hi + slack, (key, row[key], before[i], after[i])
    assert row["rss"] > 40 * 1024 * 1024  # the bytearray, shared with the child since the fork


def test_tree_lists_parent_then_child_and_totals_add_up(ebb_bin, sleeper):
    parent, child = sleeper
    out = ebb(ebb_bin, "ps", "--json", "--sort", "pid", "--tree", str(parent))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    pids = [r["pid"] for r in doc["processes"]]
    assert sorted(pids) == sorted([parent, child])
    assert doc["total"]["processes"] == 2
    for key in ("rss", "pss", "uss", "shared", "swap"):
        assert doc["total"][key] == sum(r[key] for r in doc["processes"])
    # The forked child shares the 40 MB copy-on-write: PSS splits it.
    child_row = next(r for r in doc["processes"] if r["pid"] == child)
    assert child_row["shared"] > 30 * 1024 * 1024
    assert child_row["pss"] < child_row["rss"]


def test_human_output_has_header_rows_and_total(ebb_bin, sleeper):
    parent, child = sleeper
    out = ebb(ebb_bin, "ps", str(parent), str(child))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["PID", "RSS", "PSS", "USS", "SHARED", "SWAP", "HEAP", "FREE", "PURGED", "ALLOC",
                                "COMMAND"]
    assert {int(l.split()[0]) for l in lines[1:3]} == {parent, child}
    assert lines[-1].endswith("total of 2 processes")
    assert "M" in lines[1].split()[1]  # ~40 MB shown in human units


def test_vanished_pid_is_reported_not_fatal(ebb_bin, sleeper):
    parent, _ = sleeper
    gone = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    out = ebb(ebb_bin, "ps", "--json", str(parent), str(dead))
    assert out.returncode == 1
    assert f"no process {dead}" in out.stderr
    states = {r["pid"]: r["state"] for r in json.loads(out.stdout)["processes"]}
    assert states == {parent: "ok", dead: "gone"}


@pytest.mark.parametrize("args", [["ps", "--sort", "bogus"], ["ps", "notapid"], ["ps", "--nope"], ["frobnicate"], []])
def test_bad_usage_exits_2_with_a_message(ebb_bin, args):
    out = ebb(ebb_bin, *args)
    assert out.returncode == 2
    assert out.stderr.strip()


def test_help_and_version(ebb_bin):
    assert "ps" in ebb(ebb_bin, "--help").stdout
    version = ebb(ebb_bin, "--version")
    assert version.returncode == 0 and version.stdout.startswith("ebb ")

"""ebb compare end to end: a small script under two allocators, its JSON
checked, its plot parsed and rendered to PNG."""
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

PY = "/usr/bin/python3"

# Builds ~60 MB, holds it (so that sampling sees the peak), frees it, idles:
# the allocators must differ after the free.
SCRIPT = """
import time
big = ['x' * 5000 + str(i) for i in range(12000)]
small = ['x' * 5000]  # as in the seed: one survivor allocated last pins glibc's heap top
time.sleep(0.3)
del big
time.sleep(1.0)
print("done")
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "work.py"
    path.write_text(SCRIPT)
    return str(path)


def compare(ebb_bin, ebb_lib, cwd, *args):
    env = {"EBB_LIB": ebb_lib, "PATH": "/usr/bin:/bin"}
    return subprocess.run([ebb_bin, "compare", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


def test_two_allocators_json_and_plot(ebb_bin, ebb_lib, script, tmp_path):
    out = compare(ebb_bin, ebb_lib, tmp_path, "--allocators", "ebb,system", "--runs", "2", "--json",
                  "result.json", "--plot", "plot.svg", "--", PY, script)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["command"] == [PY, script] and doc["runs"] == 2 and doc["metric"] == "rss"
    by_name = {a["name"]: a for a in doc["allocators"]}
    assert set(by_name) == {"ebb", "system"}
    assert by_name["ebb"]["library"] == ebb_lib
    for a in doc["allocators"]:
        assert len(a["runs"]) == 2
        for r in a["runs"]:
            assert r["exit"] == 0 and not r["timed_out"]
            assert len(r["samples"]) > 20  # 1.5 s at 20 ms
            assert r["peak"] == max(b for _, b in r["samples"])
            assert r["peak"] > 50 * 2**20
            assert r["wall_s"] > 1.0
    for a in doc["allocators"]:
        for r in a["runs"]:
            # GB*s is the area under the sampled curve (a step between samples, the
            # last one held to the end); final is the last sample.
            s = r["samples"]
            area = sum(b * ((s[i + 1][0] if i + 1 < len(s) else r["wall_s"]) - t) for i, (t, b) in enumerate(s))
            assert abs(area / 1e9 - r["gb_s"]) < 1e-6 * max(1.0, r["gb_s"])
            assert r["final"] == s[-1][1]
        gb = sorted(r["gb_s"] for r in a["runs"])
        assert a["median"]["gb_s"] == pytest.approx(sum(gb) / 2)
    # ebb gives the freed 60 MB back while the script sleeps.
    assert by_name["ebb"]["median"]["final"] < by_name["ebb"]["median"]["peak"] / 2
    # The command's output went to the log, not the table.
    assert "done" in (tmp_path / "ebb-compare.log").read_text()
    assert "done" not in out.stdout
    assert out.stdout.splitlines()[0].split()[:3] == ["ALLOCATOR", "PEAK", "RSS"]

    svg = ET.parse(tmp_path / "plot.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = [p for p in svg.iter(ns + "polyline") if p.get("class") == "series"]
    assert [p.get("data-name") for p in lines] == ["ebb", "system"]
    for p in lines:
        assert len(p.get("points").split()) > 20
    texts = [t.text or "" for t in svg.iter(ns + "text")]
    assert "time (s)" in texts and "RSS (MB)" in texts
    assert any(t.startswith("ebb (peak") for t in texts) and any(t.startswith("system (peak") for t in texts)

    rsvg = shutil.which("rsvg-convert")
    if rsvg is None:
        pytest.skip("rsvg-convert (librsvg2-bin) not installed: plot not rendered")
    subprocess.run([rsvg, "-o", str(tmp_path / "plot.png"), str(tmp_path / "plot.svg")], check=True, timeout=60)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_page_embeds_chart_and_table(ebb_bin, ebb_lib, script, tmp_path):
    out = compare(ebb_bin, ebb_lib, tmp_path, "--allocators", "ebb", "--plot", "page.html", "--", PY, script)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "page.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "ALLOCATOR" in page


def test_missing_peer_is_skipped_not_fatal(ebb_bin, ebb_lib, script, tmp_path):
    out = compare(ebb_bin, ebb_lib, tmp_path, "--allocators", "ebb,/no/such/lib.so,bogus", "--", PY, script)
    assert out.returncode == 0, out.stderr
    assert "skipping /no/such/lib.so" in out.stderr and "skipping bogus" in out.stderr


def test_command_not_found_exits_127(ebb_bin, ebb_lib, tmp_path):
    out = compare(ebb_bin, ebb_lib, tmp_path, "--", "no-such-command-xyz")
    assert out.returncode == 127
    assert "command not found" in out.stderr


def test_failing_command_is_reported(ebb_bin, ebb_lib, tmp_path):
    out = compare(ebb_bin, ebb_lib, tmp_path, "--allocators", "system", "--", PY, "-c", "raise SystemExit(3)")
    assert out.returncode == 1
    assert out.stdout.splitlines()[1].split()[-1] == "3"


def test_bad_plot_name_and_missing_command(ebb_bin, ebb_lib, script, tmp_path):
    out = compare(ebb_bin, ebb_lib, tmp_path, "--allocators", "system", "--plot", "x.gif", "--", PY, script)
    assert out.returncode == 2 and "want a .svg or .html" in out.stderr
    assert compare(ebb_bin, ebb_lib, tmp_path).returncode == 2


def test_pss_of_a_forking_command_counts_the_whole_tree(ebb_bin, ebb_lib, tmp_path):
    # A parent and a forked child sharing 40 MB copy-on-write: summed RSS counts
    # it twice, summed PSS once.
    code = ("import os, time\n"
            "data = bytearray(40 << 20)\n"
            "for i in range(0, len(data), 4096): data[i] = 1\n"
            "pid = os.fork()\n"
            "time.sleep(1.0)\n"
            "if pid: os.waitpid(pid, 0)\n")
    results = {}
    for metric in ("rss", "pss"):
        args = ["--allocators", "system", "--json", f"{metric}.json", "--", PY, "-c", code]
        if metric == "pss":
            args.insert(0, "--pss")
        out = compare(ebb_bin, ebb_lib, tmp_path, *args)
        assert out.returncode == 0, out.stderr
        doc = json.loads((tmp_path / f"{metric}.json").read_text())
        assert doc["metric"] == metric
        results[metric] = doc["allocators"][0]["median"]["peak"]
    assert results["rss"] > 80 * 2**20  # both processes' 40 MB
    assert 40 * 2**20 < results["pss"] < 60 * 2**20  # shared pages counted once

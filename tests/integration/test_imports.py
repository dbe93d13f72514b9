"""ebb imports and python3 -m ebb.imports: the import tree of real programs, and what it says they keep."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_run import APPS, celery_task, redis_url  # noqa: F401

PY = "/usr/bin/python3"
PYTHON_DIR = str(REPO / "python")

# A imports B then C. B keeps about 20 MB, C about 2 MB, in bytes objects of
# many sizes (so that no one size class's rounding decides the result); each
# says what it keeps as Python counts it (sys.getsizeof), and has a function.
MODULE = '''
import sys
KEEP = [bytes(200 + (i * 7919) % 4000) for i in range({count})]
KEPT = sum(sys.getsizeof(x) for x in KEEP) + sys.getsizeof(KEEP)
def use():
    return len(KEEP)
'''


def make_package(tmp_path):
    (tmp_path / "A.py").write_text("import B\nimport C\n")
    (tmp_path / "B.py").write_text(MODULE.format(count=9500))
    (tmp_path / "C.py").write_text(MODULE.format(count=950))
    return tmp_path


def workload(out):
    """The -c program: import A, use B only, and write what B and C say they keep."""
    return (f"import A\nimport B, C, json\nB.use()\n"
            f"json.dump({{'B': B.KEPT, 'C': C.KEPT}}, open({str(out)!r}, 'w'))\n")


def node(tree, name):
    for n in tree:
        if n["name"] == name:
            return n
    raise AssertionError(f"{name} not among {[n['name'] for n in tree]}")


def near(value, expected, within=0.05):
    return abs(value - expected) <= within * expected


def check_package_report(report, kept, counters):
    assert report["counters"] == counters
    a = node(report["tree"], "A")
    assert [c["name"] for c in a["children"]] == ["B", "C"]  # the tree, biggest first
    b, c = a["children"]
    assert b["children"] == [] and c["children"] == []
    for n, name in ((b, "B"), (c, "C")):
        assert near(n["live"], kept[name]), (name, n["live"], kept[name])
        assert near(n["self_live"], kept[name]), (name, n["self_live"], kept[name])
        assert n["imported_by"] == "A" and n["at"].endswith("A.py:" + ("1" if name == "B" else "2"))
    assert near(a["live"], kept["B"] + kept["C"])
    assert abs(a["self_live"]) < 0.05 * kept["C"]
    if counters == "libebb":
        assert b["objects"] >= 9500 and c["objects"] >= 950
        assert b["allocated"] >= b["live"]
    names = [x["name"] for x in report["lazy_candidates"]]
    assert "C" in names and "B" not in names and "A" not in names
    assert node(report["lazy_candidates"], "C")["live"] == c["live"]


def test_ebb_imports_measures_a_package_tree_with_libebb(ebb_bin, tmp_path):
    make_package(tmp_path)
    out = tmp_path / "kept.json"
    r = subprocess.run([ebb_bin, "imports", "--json", "--usage", "--", PY, "-c", workload(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    check_package_report(json.loads(r.stdout), json.loads(out.read_text()), "libebb")


def test_python_m_ebb_imports_then_with_libebb_and_with_tracemalloc(preload_env, tmp_path):
    make_package(tmp_path)
    out = tmp_path / "kept.json"
    then = f"import B, C, json\nB.use()\njson.dump({{'B': B.KEPT, 'C': C.KEPT}}, open({str(out)!r}, 'w'))"
    plain = {k: v for k, v in preload_env.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC")}
    for env, counters in ((preload_env, "libebb"), (plain, "tracemalloc")):
        r = subprocess.run([PY, "-m", "ebb.imports", "--json", "--then", then, "A"], cwd=tmp_path,
                           env=dict(env, PYTHONPATH=PYTHON_DIR), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        check_package_report(json.loads(r.stdout), json.loads(out.read_text()), counters)
    # The text report: the tree, and C as the candidate.
    r = subprocess.run([PY, "-m", "ebb.imports", "--then", then, "A"], cwd=tmp_path,
                       env=dict(preload_env, PYTHONPATH=PYTHON_DIR), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ebb imports: ") and "(libebb counters)" in lines[0]
    tree = [line for line in lines if line.rstrip().endswith(("├─ B", "└─ C"))]
    assert len(tree) == 2, r.stdout
    candidates = lines[lines.index(next(x for x in lines if x.startswith("Lazy-import candidates"))) + 1:]
    assert any(x.split()[1:2] == ["C"] for x in candidates) and not any(x.split()[1:2] == ["B"] for x in candidates)


def names_of(tree):
    for n in tree:
        if "error" not in n:
            yield n["name"]
        yield from names_of(n["children"])


def test_every_module_of_a_real_import_appears_once(ebb_bin, tmp_path):
    out = tmp_path / "modules.json"
    code = f"import flask, email.parser, json, sys\njson.dump(sorted(sys.modules), open({str(out)!r}, 'w'))\n"
    r = subprocess.run([ebb_bin, "imports", "--json", "--", PY, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    listed = (list(names_of(report["tree"])) + report["loaded_at_start"] + report["loaded_by_ebb"] +
              list(report["aliases"]) + report["added_to_sys_modules"])
    modules = json.loads(out.read_text())
    assert len(modules) > 150
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert twice == []
    assert sorted(set(listed)) == modules
    assert report["aliases"].get("os.path") is None or report["aliases"]["os.path"] == "posixpath"
    assert "flask" in [n["name"] for n in report["tree"]] and report["counters"] == "libebb"
    # Sorted: every node's children from the largest down.
    def check(tree):
        lives = [n["live"] for n in tree]
        assert lives == sorted(lives, reverse=True)
        for n in tree:
            check(n["children"])
    check(report["tree"])


def test_for_writes_the_report_then_stops_a_worker(ebb_bin, tmp_path):
    code = "import json, time\nwhile True:\n    time.sleep(0.05)\n"
    start = time.monotonic()
    r = subprocess.run([ebb_bin, "imports", "--for", "1s", "--min", "0", "--", PY, "-c", code], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 20
    assert any(line.endswith(" json  (<string>:1)") for line in r.stdout.splitlines()), r.stdout


@pytest.mark.parametrize("kind", ["rq", "celery"])
def test_tasks_writes_the_report_after_a_workers_first_n_tasks(ebb_bin, redis_url, kind, tmp_path):  # noqa: F811
    """The workload of --usage is the worker's first 3 tasks; then ebb stops it."""
    import redis
    db = redis.Redis.from_url(redis_url)
    if kind == "rq":
        import rq
        q = rq.Queue(connection=db)
        for i in range(10):
            q.enqueue("rq_jobs.work", i, "x" * 1000)
        command = [PY, "/usr/bin/rq", "worker", "--url", redis_url, "--worker-class", "ebb.rq.SimpleWorker",
                   "--quiet", "default"]
        task_module = "rq_jobs"
    else:
        work = celery_task(redis_url)
        for i in range(10):
            work.delay(i, "x" * 1000)
        command = [PY, "-m", "ebb.celery", "-A", "celery_app", "--workdir", APPS, "worker", "--pool=solo",
                   "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"]
        task_module = "celery_app"
    env = dict(os.environ, EBB_TEST_REDIS=redis_url, PYTHONPATH=f"{APPS}:{PYTHON_DIR}")
    out = tmp_path / "report.json"  # not the standard output: Celery prints its banner there
    r = subprocess.run([ebb_bin, "imports", "--json", "--usage", "--tasks", "3", "-o", str(out), "--"] + command,
                       env=env, cwd=APPS, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    done = len(db.lrange("done", 0, -1))
    assert 3 <= done <= 4, done  # the report after the third, and the worker stops between tasks
    names = set(names_of(report["tree"]))
    assert task_module in names and kind in names
    candidates = {c["name"] for c in report["lazy_candidates"]}
    assert task_module not in candidates and kind not in candidates
    assert report["counters"] == "libebb"


@pytest.mark.parametrize("case", ["missing module", "not python", "not found", "no command", "bad min"])
def test_bad_input_gets_one_clear_line(ebb_bin, case, tmp_path):
    args = {
        "missing module": ["--", PY, "-c", "import no_such_module_here"],
        "not python": ["--", "/bin/true"],
        "not found": ["--", "no-such-command-here"],
        "no command": [],
        "bad min": ["--min", "lots", "--", PY, "-c", "pass"],
    }[case]
    r = subprocess.run([ebb_bin, "imports"] + args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    ours = [line for line in r.stderr.splitlines() if line.startswith("ebb imports: ")]
    assert len(ours) == 1, r.stderr
    want = {
        "missing module": (1, "the command exited with status 1"),
        "not python": (1, "/bin/true wrote no import report (it exited with status 0)"),
        "not found": (127, "cannot run no-such-command-here: not found"),
        "no command": (2, "no command"),
        "bad min": (2, "--min wants a size"),
    }[case]
    assert r.returncode == want[0] and want[1] in ours[0], r.stderr
    if case == "missing module":
        assert ("The program ended with an exception: ModuleNotFoundError: No module named "
                "'no_such_module_here'") in r.stdout


def test_python_m_ebb_imports_names_the_module_it_cannot_import(tmp_path):
    r = subprocess.run([PY, "-m", "ebb.imports", "json", "no_such_module_here"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR), timeout=60, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "ebb.imports: cannot import no_such_module_here: ModuleNotFoundError: No module named 'no_such_module_here'"]
    r = subprocess.run([PY, "-m", "ebb.imports", "--min", "lots", "json"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR), timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith("--min wants a size such as 64K, not 'lots'")

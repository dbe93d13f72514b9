"""sqlite3 under libebb. Debian's libpython3.11-testsuite ships no
test_sqlite3, so this stands in for it: a workload through the sqlite3
module (and SQLite's own mallocs) must give the same answers as under glibc."""
import subprocess

PY = "/usr/bin/python3"

WORKLOAD = r"""
import hashlib, os, sqlite3, sys
h = hashlib.sha256()
for path in (":memory:", os.path.join(sys.argv[1], "db.sqlite")):
    con = sqlite3.connect(path)
    con.execute("create table t(id integer primary key, name text, data blob)")
    with con:
        con.executemany("insert into t(name, data) values (?, ?)",
                        ((f"n{i}" * (i % 40), bytes([i % 256]) * (i % 3000)) for i in range(40000)))
    con.execute("create index ix on t(name)")
    try:
        with con:
            con.execute("delete from t where id % 2 = 0")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    with con:
        con.execute("update t set data = zeroblob(5000) where id % 97 = 0")
    for row in con.execute("select id, name, length(data), hex(substr(data, 1, 4)) from t "
                           "where id % 7 = 0 order by name, id"):
        h.update(repr(row).encode())
    h.update(repr(con.execute("select count(*), sum(length(data)) from t").fetchone()).encode())
    con.execute("vacuum")
    con.close()
print(h.hexdigest())
"""


def run(env, tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    out = subprocess.run([PY, "-c", WORKLOAD, str(d)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_sqlite3_gives_the_same_answers_as_under_glibc(preload_env, tmp_path):
    plain = {k: v for k, v in preload_env.items() if k != "LD_PRELOAD"}
    expected = run(plain, tmp_path, "glibc")
    assert len(expected) == 64
    assert run(preload_env, tmp_path, "ebb") == expected

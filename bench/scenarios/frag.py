#!/usr/bin/python3
"""Seed scenario "frag": 100,000 distinct ~5 KB strings, one more, then del.

After `del big` only the one extra string (and its list) is live.  With glibc
that late allocation sits at the top of the brk heap and pins ~500 MB; an
allocator that returns freed pages should fall back to near the interpreter's
base RSS.  Prints one JSON line (see _common.py).
"""
import _common

COUNT = 100_000


def alloc(n):
    # 'x' * 5000 is not constant-folded (> 4096 chars) and + str(i) makes
    # every string a distinct, unshared object of ~5 KB.
    return ["x" * 5000 + str(i) for i in range(n)]


def main():
    idle, trim = _common.setup(__doc__)
    big = alloc(COUNT)
    build_kb = _common.status_kb("VmRSS")
    small = alloc(1)  # as in the seed: one late allocation that outlives big
    del big
    trim()
    del_kb = _common.status_kb("VmRSS")
    _common.finish("frag", build_kb, del_kb, idle)
    assert len(small) == 1


if __name__ == "__main__":
    main()

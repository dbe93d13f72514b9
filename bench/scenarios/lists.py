#!/usr/bin/python3
"""Seed scenario "lists": ~4.5 million small strings, keep every 1000th, del.

Builds str(i)*3 for i in range(n), for n in range(3000), all into one list
(sum(range(3000)) = 4,498,500 strings of 3-12 characters), keeps every
1000th string in a second list, then deletes the big list.  The ~4,500
survivors are scattered over the whole heap, so an allocator can only give
memory back page by page, not arena by arena.  Prints one JSON line.
"""
import _common

ROUNDS = 3000
KEEP_EVERY = 1000


def main():
    idle, trim = _common.setup(__doc__)
    big = []
    for n in range(ROUNDS):
        strings = [str(i) * 3 for i in range(n)]
        big.extend(strings)
    del strings
    build_kb = _common.status_kb("VmRSS")
    keep = big[::KEEP_EVERY]
    del big
    trim()
    del_kb = _common.status_kb("VmRSS")
    _common.finish("lists", build_kb, del_kb, idle)
    assert len(keep) == -(-sum(range(ROUNDS)) // KEEP_EVERY)


if __name__ == "__main__":
    main()

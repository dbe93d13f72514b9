#!/usr/bin/python3
"""List/tuple building: comprehensions, zips, sorts, slices and nested tuples."""
import random

rng = random.Random(42)
checksum = 0
for step in range(60):
    nums = [rng.randrange(1_000_000) for _ in range(20000)]
    pairs = list(zip(nums, range(len(nums))))
    pairs.sort()
    triples = [(a, b, (a ^ b) & 0xFF) for a, b in pairs[::2]]
    chunks = [tuple(triples[i:i + 16]) for i in range(0, len(triples), 16)]
    flat = [x for chunk in chunks for t in chunk for x in t]
    rev = flat[::-1]
    checksum = (checksum + len(chunks) + sum(rev[:1000]) + triples[-1][2]) % 1_000_000_007
print(checksum)

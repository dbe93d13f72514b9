#!/usr/bin/python3
"""String building: +=, f-strings, join, split, replace, upper/lower."""
import random

rng = random.Random(7)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 12)))
         for _ in range(2000)]
checksum = 0
for step in range(450):
    s = ""
    for i in range(4000):
        s += words[(i * 31 + step) % 2000] + " "
    line = ", ".join(f"{w}={i}" for i, w in enumerate(s.split()))
    parts = line.replace("=", ":").upper().split(", ")
    rebuilt = "|".join(p.lower()[::-1] for p in parts)
    checksum = (checksum + len(rebuilt) + sum(map(len, parts[::50])) + sum(map(ord, rebuilt[:64]))) % 1_000_000_007
print(checksum)

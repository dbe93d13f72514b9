#!/usr/bin/python3
"""Dict churn: build, update, probe and delete many small dicts and a big one."""
import random

rng = random.Random(1234)
keys = [f"k{i}" for i in range(5000)]
table = {}
checksum = 0
for step in range(200):
    small = [{"id": i, "name": keys[i % 5000], "step": step, "v": rng.random()}
             for i in range(3000)]
    for d in small:
        d["sq"] = d["id"] * d["id"]
        table[(step % 7, d["name"])] = d
    for k in rng.sample(keys, 800):
        table.pop((step % 7, k), None)
    merged = {**small[0], **small[-1]}
    checksum = (checksum + len(table) + len(merged) + sum(d["id"] for d in small[::97])) % 1_000_000_007
print(checksum)

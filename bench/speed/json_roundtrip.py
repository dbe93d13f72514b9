#!/usr/bin/python3
"""JSON round trips: dumps and loads of nested records, with and without indent."""
import json
import random

rng = random.Random(99)
checksum = 0
for step in range(40):
    records = [{"id": i, "name": f"user{rng.randrange(10**6)}", "score": rng.random(),
                "tags": [f"t{rng.randrange(50)}" for _ in range(rng.randrange(1, 6))],
                "geo": {"lat": rng.uniform(-90, 90), "lon": rng.uniform(-180, 180)},
                "active": rng.random() < 0.5}
               for i in range(3000)]
    text = json.dumps(records, indent=1 if step % 2 else None, sort_keys=step % 3 == 0)
    back = json.loads(text)
    again = json.loads(json.dumps(back[::3]))
    checksum = (checksum + len(text) + len(again) + sum(len(r["tags"]) for r in back)) % 1_000_000_007
print(checksum)

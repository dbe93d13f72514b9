#!/usr/bin/python3
"""One process doing the work of bench/celery_fleet.py's fleet, without Celery:
for each of N documents (10 KB-5 MB, log-uniform, the fleet's four shapes and
seeded generator), what the client encodes (JSON), what the master decodes and
pickles for a pool process, and what the task builds from it; the last 8
results are kept. Used to tell the allocator's share of the fleet's tasks/s
(docs/benchmarks.md, "Where libebb's time goes"), for example under callgrind:

    valgrind --tool=callgrind /usr/bin/python3 bench/speed/celery_task_mix.py 40
    LD_PRELOAD=build/lib/libebb.so PYTHONMALLOC=malloc valgrind --tool=callgrind \\
        /usr/bin/python3 bench/speed/celery_task_mix.py 40
"""
import json
import os
import pickle
import random
import sys

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [BENCH, os.path.join(BENCH, "celery_fleet")]
from celery_fleet import document  # noqa: E402 (the fleet's own generator)
from work import build_result  # noqa: E402 (the fleet's task body)

rng = random.Random(0)
kept = []
for n in range(int(sys.argv[1]) if len(sys.argv) > 1 else 200):
    doc = document(rng, int(2 ** rng.uniform(13.3, 22.3)))
    body = json.dumps([[n], {"i": n, "doc": doc, "keep_s": 1}, {}])  # the client's message
    job = pickle.dumps(json.loads(body), protocol=4)  # the master decodes it and sends it to the pool
    d = pickle.loads(job)[1]["doc"]  # the pool process: the task's body (bench/celery_fleet/app.py)
    kept = kept[-7:] + [build_result(d)]
print(len(kept))

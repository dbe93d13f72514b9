"""Celery app for bench/celery_fleet.py: seed 000's kind of task mix.

Broker and bookkeeping: Redis at $EBB_BENCH_REDIS. `job(i, doc, keep_s)`
counts its start and its completion per task id in Redis (hashes `started`
and `done`), walks a document of 10 KB-5 MB (the kwargs), builds a result
from it, keeps the result in the process for `keep_s` seconds (a cache),
drops results whose time is up, and leaks 2 KB per task.
"""
import os
import time

import redis
from celery import Celery
from work import build_result

URL = os.environ["EBB_BENCH_REDIS"]
app = Celery("celery_fleet_app", broker=URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
)
_r = None
_kept = []  # (deadline, result)
_leak = []


def db():
    global _r
    if _r is None:  # one connection per pool process, made after the fork
        _r = redis.Redis.from_url(URL)
    return _r


@app.task(name="job")
def job(i, doc, keep_s):
    db().hincrby("started", i)
    result = build_result(doc)
    now = time.monotonic()
    _kept.append((now + keep_s, result))
    _kept[:] = [(t, x) for t, x in _kept if t > now]
    _leak.append(bytearray(2048))
    db().hincrby("done", i)
    return len(result)

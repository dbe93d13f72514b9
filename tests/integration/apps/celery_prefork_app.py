"""A Celery app for prefork tests under `ebb run --children`.

The broker is Redis at $EBB_TEST_REDIS (started by the test). Every task
counts its start and its completion per task id in two Redis hashes,
"started" and "done", so a test sees a task that was lost (no completion)
or ran twice (two starts or two completions). Each call keeps about
$EBB_TEST_KEEP bytes (default 1.5 MB, touched) in its pool process, so the
pool's children grow until ebb recycles them. $EBB_TEST_ACKS_LATE=1 turns
on task_acks_late (with task_reject_on_worker_lost). $EBB_TEST_MASTER_KEEP
bytes (default 0) are kept by the master per task it receives, as a master
fed large kwargs grows (seed 002); a task received by a master that
ebb.celery drains is counted in "received_while_draining", and every task
a master receives in "received". Each completion's time is appended to the
list "done_at".
"""
import os
import sys
import time

import redis
from celery import Celery, signals

URL = os.environ["EBB_TEST_REDIS"]
ACKS_LATE = os.environ.get("EBB_TEST_ACKS_LATE") == "1"
KEEP = int(os.environ.get("EBB_TEST_KEEP", 1_500_000))
MASTER_KEEP = int(os.environ.get("EBB_TEST_MASTER_KEEP", 0))

# $EBB_TEST_BROKEN_REDEPLOY=FILE: the first master under ebb creates FILE,
# and every later one fails at import, as a broken deploy would.
BROKEN = os.environ.get("EBB_TEST_BROKEN_REDEPLOY")
if BROKEN and os.environ.get("EBB_WORKER_ID"):
    if os.path.exists(BROKEN):
        raise SystemExit("celery_prefork_app: broken deploy (test)")
    open(BROKEN, "w").close()

# $EBB_TEST_SLOW_REDEPLOY=FILE:SECONDS: the first master under ebb creates
# FILE, and every later one takes SECONDS to import (a slow deploy).
SLOW = os.environ.get("EBB_TEST_SLOW_REDEPLOY")
if SLOW and os.environ.get("EBB_WORKER_ID"):
    marker, delay = SLOW.rsplit(":", 1)
    if os.path.exists(marker):
        time.sleep(float(delay))
    open(marker, "w").close()

app = Celery("celery_prefork_app", broker=URL)
app.conf.update(
    task_acks_late=ACKS_LATE,
    task_reject_on_worker_lost=ACKS_LATE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
kept = []  # the leak of the pool process: what each task keeps


@signals.task_received.connect
def _master_keeps(request=None, **kwargs):
    # In the master: task_received is sent where messages arrive.
    results.incr("received")
    if MASTER_KEEP:
        kept.append(bytearray(MASTER_KEEP))
    drain = getattr(sys.modules.get("ebb.celery"), "_drain", None)
    if drain and drain["since"] is not None:  # a draining master must take no new task
        results.incr("received_while_draining")
results = redis.Redis.from_url(URL)


@app.task(name="work")
def work(task_id, payload, seconds=0.02):
    results.hincrby("started", task_id, 1)
    kept.append(bytearray(KEEP) + payload.encode())  # zero-filled: touched page by page
    time.sleep(seconds)
    results.hincrby("done", task_id, 1)
    results.rpush("done_at", time.time())
    return len(payload)

"""A Celery app for `ebb run` tests: every task keeps its (large) kwargs.

The broker is Redis at $EBB_TEST_REDIS (started by the test). Each task
appends its id to the Redis list "done" when it finishes, so the test can
count that every task ran exactly once. acks_late: a task is acknowledged
only after it ran, so a worker stopped mid-task does not lose it.
"""
import os
import time

import redis
from celery import Celery

URL = os.environ["EBB_TEST_REDIS"]
app = Celery("celery_app", broker=URL)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
kept = []  # the leak: seed 002's large kwargs, never let go
results = redis.Redis.from_url(URL)


@app.task(name="work")
def work(task_id, payload):
    kept.append(payload + str(task_id))  # a distinct copy
    time.sleep(0.02)
    results.rpush("done", task_id)
    return len(payload)

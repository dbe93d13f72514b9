"""Celery app for bench/celery_master.py: tasks whose kwargs are large.

Broker: Redis at $EBB_BENCH_REDIS. `handle(doc)` reads a few fields of a
document of 1-20 MB and drops it, as seed 002's tasks did; the memory the
main process keeps is the messages it prefetched (kombu, the request, the
job pickled for the pool), not the task's.
"""
import os
import time

from celery import Celery

app = Celery("celery_master_app", broker=os.environ["EBB_BENCH_REDIS"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
)


@app.task(name="handle")
def handle(doc, seconds=0.02):
    n = len(doc.get("rows", ())) + len(doc.get("blob", "")) + len(doc.get("tree", {}))
    time.sleep(seconds)
    return n

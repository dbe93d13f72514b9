"""A Celery app using ebb.celery.freeze_before_fork() (when EBB_TEST_FREEZE=1):
each task reports, from the pool process that ran it, whether its collector
runs and how many objects are frozen, to the Redis list "report"."""
import gc
import json
import os

if os.environ.get("EBB_TEST_FREEZE") == "1":
    import ebb.celery
    ebb.celery.freeze_before_fork()

import redis  # noqa: E402
from celery import Celery  # noqa: E402

URL = os.environ["EBB_TEST_REDIS"]
app = Celery("celery_freeze_app", broker=URL)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
TABLE = {i: str(i) * 3 for i in range(50_000)}  # the app's data, loaded in the parent


@app.task(name="report")
def report():
    redis.Redis.from_url(URL).rpush("report", json.dumps(
        {"pid": os.getpid(), "gc": gc.isenabled(), "frozen": gc.get_freeze_count()}))

"""Jobs for the RQ test of `ebb run`: each keeps its (large) argument.

Run in-process by rq's SimpleWorker (no fork per job), so the worker grows
like a long-running one does. Each job appends its id to the Redis list
"done" when it finishes, so the test can count every job exactly once.
"""
import os
import time

import redis

kept = []


def work(job_no, payload):
    kept.append(payload + str(job_no))  # a distinct copy, never let go
    time.sleep(0.02)
    redis.Redis.from_url(os.environ["EBB_TEST_REDIS"]).rpush("done", job_no)
    return len(payload)

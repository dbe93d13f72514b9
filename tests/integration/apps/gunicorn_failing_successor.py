"""gunicorn config for a warm restart that fails.

The first master keeps 100 MB (touched), above ebb's --master-hard-limit.
A master started by its SIGUSR2 (gunicorn sets GUNICORN_PID for it) forks
workers that fail to boot after 1.5 s, so that master halts ("Worker failed
to boot") and the old one must stay.
"""
import os
import time

kept = []


def on_starting(server):
    if not os.environ.get("GUNICORN_PID"):
        kept.append(b"\x01" * (100 << 20))


def post_worker_init(worker):
    if os.environ.get("GUNICORN_PID"):
        time.sleep(1.5)
        raise RuntimeError("this worker refuses to boot under a new master")

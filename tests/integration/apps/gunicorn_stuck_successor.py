"""gunicorn config for a warm restart whose new master never starts its workers.

The first master keeps 100 MB (touched), above ebb's --master-hard-limit.
A master started by its SIGUSR2 (gunicorn sets GUNICORN_PID for it) hangs
in when_ready, before it forks a worker, as a master stuck on a slow
dependency would; it does not leave that hook on SIGTERM either.
"""
import os
import time

kept = []


def on_starting(server):
    if not os.environ.get("GUNICORN_PID"):
        kept.append(b"\x01" * (100 << 20))


def when_ready(server):
    if os.environ.get("GUNICORN_PID"):
        while True:
            time.sleep(1)

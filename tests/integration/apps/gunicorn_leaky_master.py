"""gunicorn config whose master keeps 8 MB (touched) each time it forks a worker.

Stands for a master that grows as it replaces workers (ebb run --children
--master-hard-limit restarts it); the workers run leaky_app.
"""
kept = []


def pre_fork(server, worker):
    kept.append(b"\x01" * (8 << 20))

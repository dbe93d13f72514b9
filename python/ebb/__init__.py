"""ebb's Python side: glue for worker frameworks running under `ebb run`.

- ebb.rq: RQ workers that stop between jobs when ebb recycles them, so no
  job is lost (`rq worker --worker-class ebb.rq.SimpleWorker`).
- ebb.celery: the same for Celery (`python3 -m ebb.celery -A proj worker`,
  or `ebb.celery.install(app)`).

Importing ebb imports nothing else: each submodule is used on its own.
"""

__all__ = ["celery", "rq"]

# gunicorn --preload with ebb's gc.freeze hooks (python/ebb/gunicorn.py).
from ebb.gunicorn import post_fork, when_ready  # noqa: F401

preload_app = True

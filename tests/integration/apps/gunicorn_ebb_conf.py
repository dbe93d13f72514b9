# gunicorn config using ebb's hooks (tests/integration/test_python.py).
from ebb.gunicorn import post_fork, when_ready  # noqa: F401

preload_app = True

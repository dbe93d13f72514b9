"""Shared fixtures for ebb's integration tests (run with /usr/bin/python3 -m pytest)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def built_file(variable, default, what):
    """$variable, else REPO/default; skips when missing, unless EBB_REQUIRE_LIB is set (then fails)."""
    path = Path(os.environ.get(variable) or REPO / default)
    if not path.is_file():
        msg = f"{what} not found at {path} (build it, or set {variable})"
        if os.environ.get("EBB_REQUIRE_LIB"):
            pytest.fail(msg + "; EBB_REQUIRE_LIB is set", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def ebb_lib():
    """Resolved path of the libebb.so to preload: $EBB_LIB, else build/lib/libebb.so."""
    return str(built_file("EBB_LIB", "build/lib/libebb.so", "libebb").resolve())


@pytest.fixture(scope="session")
def ebb_bin():
    """Path of the ebb command: $EBB_BIN, else build/bin/ebb."""
    return str(built_file("EBB_BIN", "build/bin/ebb", "ebb"))


@pytest.fixture(scope="session")
def preload_env(ebb_lib):
    """Environment that makes a Python process allocate through libebb only."""
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
    env.update(LD_PRELOAD=ebb_lib, PYTHONMALLOC="malloc")
    return env

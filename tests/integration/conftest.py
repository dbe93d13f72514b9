"""Shared fixtures for ebb's integration tests (run with /usr/bin/python3 -m pytest)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ebb_lib():
    """Resolved path of the libebb.so to preload: $EBB_LIB, else build/lib/libebb.so.

    Skips when the library is missing, unless EBB_REQUIRE_LIB is set (then fails).
    """
    lib = Path(os.environ.get("EBB_LIB") or REPO / "build/lib/libebb.so")
    if not lib.is_file():
        msg = f"libebb not found at {lib} (build it, or set EBB_LIB)"
        if os.environ.get("EBB_REQUIRE_LIB"):
            pytest.fail(msg + "; EBB_REQUIRE_LIB is set", pytrace=False)
        pytest.skip(msg)
    return str(lib.resolve())


@pytest.fixture(scope="session")
def preload_env(ebb_lib):
    """Environment that makes a Python process allocate through libebb only."""
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("PYTHON")}
    env.update(LD_PRELOAD=ebb_lib, PYTHONMALLOC="malloc")
    return env


@pytest.fixture(scope="session")
def ebb_bin():
    """Path of the ebb command: $EBB_BIN, else build/bin/ebb (same skip/fail rule as ebb_lib)."""
    path = Path(os.environ.get("EBB_BIN") or REPO / "build/bin/ebb")
    if not path.is_file():
        msg = f"ebb not found at {path} (build it, or set EBB_BIN)"
        if os.environ.get("EBB_REQUIRE_LIB"):
            pytest.fail(msg + "; EBB_REQUIRE_LIB is set", pytrace=False)
        pytest.skip(msg)
    return str(path)

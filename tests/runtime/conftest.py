"""Fixtures for the runtime tests: this folder importable by spawned worker processes, their environment (the
single-threaded torch setting is session-wide, tests/conftest.py)."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for `python -m ...` subprocesses: the repository importable, one torch thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env

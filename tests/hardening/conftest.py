"""Make this folder importable by rank processes (forkserver children unpickle the workers by module name), and
give subprocesses an environment with the repository importable and no user configs."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture
def cli_env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    return env

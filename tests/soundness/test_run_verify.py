"""`meshplan run --verify`: real rank processes check the plan against one device before training."""
import os
import re
import subprocess
import sys
from pathlib import Path

from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_run_verify_reports_equality(tmp_path):
    cfg = load_config("tiny")
    plan = Plan.build(trace(build_model(cfg)), Mesh.of(mp=2), {"attention": "sp", "moe": "ep"})
    plan.to_yaml(tmp_path / "plan.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    # A fresh interpreter: rank processes of an earlier test's forkserver would print into that test's capture.
    out = subprocess.run([sys.executable, "-m", "meshplan.cli", "run", "--nproc", "2", "--plan",
                          str(tmp_path / "plan.yaml"), "--model", "tiny", "--steps", "1", "--batch", "2", "--seq",
                          "16", "--verify"], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"verify: loss rel err ([0-9.e+-]+), grads max rel err ([0-9.e+-]+)", out.stdout)
    assert m and float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-4, out.stdout

"""`meshplan run --verify`: real rank processes check the plan against one device before training."""
import re

from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config
from meshplan.runtime.launch import cli_run


def test_run_verify_reports_equality(tmp_path, capfd):
    cfg = load_config("tiny")
    plan = Plan.build(trace(build_model(cfg)), Mesh.of(mp=2), {"attention": "sp", "moe": "ep"})
    plan.to_yaml(tmp_path / "plan.yaml")
    rc = cli_run(["--nproc", "2", "--plan", str(tmp_path / "plan.yaml"), "--model", "tiny", "--steps", "1",
                  "--batch", "2", "--seq", "16", "--verify"])
    out = capfd.readouterr().out
    assert rc == 0, out
    m = re.search(r"verify: loss rel err ([0-9.e+-]+), grads max rel err ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-4, out

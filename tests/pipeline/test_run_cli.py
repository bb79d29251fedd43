"""`meshplan plan` -> `meshplan run --plan --check`: a planner's pipeline plan runs on 4 real ranks and each step's
loss equals one device's."""
import json

import pytest
import yaml

from meshplan.cli import main as meshplan
from meshplan.runtime.launch import cli_run
from meshplan.runtime.run_plan import CheckError, check_loss


def test_planned_pipeline_runs_and_matches_one_device(tmp_path):
    plan = tmp_path / "plan.yaml"
    # A memory limit the 4-layer model only fits with pipeline stages: the planner picks pp > 1. Error budget 0:
    # no bf16/fp8 collectives, so the plan is exact and fp32 tolerance applies (a compressed plan is checked by
    # --check's own tolerance; the planner picks bf16 gradients for this plan at the default budget).
    assert meshplan(["plan", "small", "--cluster", "local", "--gpus", "4", "--memory-gb", "0.02",
                     "--error-budget", "0", "--out", str(plan)]) == 0
    mesh = yaml.safe_load(plan.read_text())["mesh"]
    assert mesh.get("pp", 1) > 1, mesh
    metrics = tmp_path / "metrics.jsonl"  # rank 0's rows (its stdout may belong to an earlier test's capture)
    rc = cli_run(["--plan", str(plan), "--model", "small", "--steps", "2", "--batch", "4", "--seq", "16",
                  "--check", "--metrics", str(metrics)])
    assert rc == 0  # a step whose loss differed from one device's would have failed the run (CheckError)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5)


def test_check_stops_at_a_differing_step():
    check_loss(0, 2.0, 2.0 * (1 + 1e-6))  # within fp32 tolerance
    with pytest.raises(CheckError, match="step 2 loss 2.100000 differs from one device's 2.000000"):
        check_loss(1, 2.1, 2.0)
    with pytest.raises(CheckError, match="step 1 loss nan"):
        check_loss(0, float("nan"), 2.0)

"""The error model's fit (measure/error_model.py) recovers a known power law, and what it writes is what the
planner's half (planner/error_model.py) prices with."""
import pytest
import yaml

from meshplan.measure.error_model import fit
from meshplan.planner import error_model


def test_fit_recovers_a_power_law_and_a_constant():
    measured = {"reduce": {"bf16": {n: 3e-3 * n ** -0.25 for n in (2, 4, 8, 16)}},
                "move": {"fp8": {1: 0.02}}}
    got = fit(measured)
    assert got["reduce"]["bf16"]["c"] == pytest.approx(3e-3, rel=1e-3)
    assert got["reduce"]["bf16"]["a"] == pytest.approx(-0.25, abs=1e-4)
    assert got["reduce"]["bf16"]["max_fit_rel_dev"] < 1e-3
    assert got["move"]["fp8"] == {"c": 0.02, "a": 0.0, "max_fit_rel_dev": 0.0}


def test_the_planner_reads_the_fitted_form(tmp_path):
    measured = {"reduce": {"bf16": {n: 1e-3 * n ** 0.5 for n in (2, 4, 8, 16)}}}
    model = {"fit": fit(measured)}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(model))
    loaded = error_model.load(str(tmp_path / "m.yaml"))
    assert error_model.relative_error("reduce", "bf16", 8, loaded) == pytest.approx(1e-3 * 8 ** 0.5, rel=1e-3)
    assert error_model.relative_error("reduce", "fp32", 8, loaded) == 0.0

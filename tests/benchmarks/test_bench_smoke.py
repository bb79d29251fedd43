"""Smoke tests for benchmarks/: every module imports, its pure functions are right and its smallest configuration
builds, so the suite does not rot. No measurements here (those are `make bench`); the whole file runs in seconds."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("common")


@pytest.mark.parametrize("name", ["common", "fidelity", "throughput", "simulate_table", "run_all", "planner_time",
                                  "planner_throughput", "published", "router_imbalance", "compile_step"])
def test_every_benchmark_imports(name):
    mod = importlib.import_module(name)
    if name not in ("common", "planner_time", "planner_throughput"):
        assert callable(mod.main)


def test_spearman_hand_computed():
    # no ties: d = (0, 1, 1, 0), rho = 1 - 6*2 / (4*15) = 0.8
    assert common.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties in b: ranks (1, 2, 3.5, 5, 3.5); Pearson of ranks = 8 / sqrt(10 * 9.5)
    assert common.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert common.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(common.spearman([1, 2, 3], [7, 7, 7]))
    assert list(common.rankdata([10, 30, 20, 20])) == [1.0, 4.0, 2.5, 2.5]


def test_relative_errors_and_median():
    assert common.relative_errors([2.0, 1.0], [1.0, 2.0]) == [1.0, 0.5]
    assert common.median([3, 1, 2]) == 2


def test_write_json_and_table(tmp_path, capsys):
    path = common.write_json("smoke", {"x": 1.5, "inf": float("inf")}, results_dir=tmp_path)
    assert path == tmp_path / "smoke.json"
    d = json.loads(path.read_text())
    assert d["benchmark"] == "smoke" and d["x"] == 1.5 and d["inf"] == float("inf")
    assert d["machine"]["cpus"] >= 1 and len(d["machine"]["loadavg_1_5_15"]) == 3
    text = common.print_table(["a", "b"], [[1, "x"]], title="t")
    assert "a" in capsys.readouterr().out and text.startswith("t\n")


def test_interleaved_timing():
    calls = []
    res = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated rounds
    assert set(res) == {"a", "b"} and all(len(r["samples_s"]) == 3 and r["median_s"] >= 0 for r in res.values())


@pytest.fixture(scope="module")
def small():
    from meshplan.ir import trace
    from meshplan.models import build_model, load_config
    from meshplan.planner import load_cluster

    model = build_model(load_config("small"), seed=0)
    return model, trace(model, (torch.zeros(8, 128, dtype=torch.long),)), load_cluster("local")


def test_fidelity_candidates_priced_and_scored(small):
    fid = importlib.import_module("fidelity")
    model, graph, cluster = small
    plans = {w: fid.candidate_plans(graph, w, 8) for w in (2, 4)}
    assert len(plans[2]) == 2 * 3 + 1 and len(plans[4]) == 2 * 2 * 3 + 1  # attn x moe x meshes + pure DP
    for w, ps in plans.items():
        assert all(p.mesh.size == w for _, p in ps)
        assert all(p.meta["pipeline"]["microbatches"] == 1 for _, p in ps)
    t = [fid.predict(graph, cluster, p, 8, 128) for _, p in plans[2]]
    assert all(0 < x < math.inf for x in t)
    pick = fid.planner_pick(model, cluster, 2, 8, 128)
    assert pick.mesh.size == 2 and fid.describe(pick, graph).startswith("dp:1,mp:2")
    rows = [{"plan": "a", "planner_pick": False, "predicted_s": 1.0, "measured_s": 2.0},
            {"plan": "b", "planner_pick": False, "predicted_s": 2.0, "measured_s": 3.0},
            {"plan": "fp32", "planner_pick": False, "pick_fp32_variant": True, "predicted_s": 9.0, "measured_s": 0.5},
            {"plan": "p", "planner_pick": True, "predicted_s": 0.5, "measured_s": 2.5}]
    s = fid.summarize(rows)
    assert s["plans"] == 2 and s["spearman"] == pytest.approx(1.0)
    assert s["median_rel_error"] == pytest.approx((0.5 + 1 / 3) / 2)
    v = fid.pick_verdict(rows)
    assert v["pick_measured_rank"] == 3 and not v["pick_is_measured_fastest"] and v["measured_fastest"] == "fp32"


def test_throughput_megatron_plan(small):
    thr = importlib.import_module("throughput")
    _, graph, cluster = small
    plan = thr.megatron_plan(graph, cluster, 4, 8, 128)
    assert plan.mesh.size == 4
    assert plan.ops["layers.1.attention"].strategy == "tp" and plan.ops["layers.1.feed_forward"].strategy == "tp"
    plan.validate(graph)


def test_simulate_table_rows_feasible_and_infeasible():
    st = importlib.import_module("simulate_table")
    from meshplan.ir import trace
    from meshplan.models import build_model, load_config
    from meshplan.planner import load_cluster

    g = trace(build_model(load_config("tiny"), device="meta"))
    rows = st.rows_for(g, load_cluster("h800"), 8, global_batch=8, seq=128)
    assert rows[0]["plan"] == "planner" and rows[0]["feasible"] and rows[0]["planner_speedup"] == 1.0
    assert {r["plan"] for r in rows} >= {"planner", "megatron", "ep_dp"}
    bad = st.rows_for(g, load_cluster("h800"), 7, global_batch=8, seq=128)  # 7 GPUs: no mesh factorises
    assert not bad[0]["feasible"] and bad[0]["note"].startswith("infeasible")
    assert st._table_row({"model": "m", "gpus": 7, **bad[0]})[7] == "no"


def test_run_all_commands():
    ra = importlib.import_module("run_all")
    cmds = dict(ra.plan_commands(quick=True))
    assert set(cmds) == set(ra.BENCHMARKS)
    for name, cmd in cmds.items():
        assert Path(cmd[1]).is_file(), cmd
    assert "--quick" in cmds["fidelity"] and "--quick" not in dict(ra.plan_commands(quick=False))["fidelity"]
    with pytest.raises(SystemExit):
        ra.plan_commands(quick=True, only=["nope"])


def test_published_results_name_every_run_and_its_source():
    pub = importlib.import_module("published")
    rows = json.loads((Path(pub.RESULTS) / "published.json").read_text())
    assert [r["name"] for r in rows] == [run.name for run in pub.RUNS]
    for r in rows:
        assert r["source"] and r["published_tflops_per_gpu"] > 0 and r["predicted_tflops_per_gpu"] > 0
        assert r["within_25pct"] == (abs(r["predicted_tflops_per_gpu"] / r["published_tflops_per_gpu"] - 1) <= 0.25)

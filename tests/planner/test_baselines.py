"""Baselines are ordinary Plans, priced by the planner's own model; the shipped tiny plans stay valid."""
import pytest

from meshplan.ir import Plan
from meshplan.resources import shipped
from meshplan.ir import graph as G
from meshplan.planner import MeshConfig, Options, search
from meshplan.planner.baselines import baseline, ep_dp_plan, megatron_plan
from meshplan.planner.cluster import load_cluster
from meshplan.planner.plans import price_plan
from meshplan.planner.simulate import simulate, table

PLANS = shipped("plans")


def test_megatron_plan_is_tp_with_sequence_parallel(graph):
    g = graph("internal-352b", n_layers=2)
    plan = megatron_plan(g, MeshConfig(8, 2, 1, 1, 4))
    plan.validate(g, batch=2, seq=8192)
    kinds = {op.name: op.kind for op in g.ops()}
    for name, p in plan.ops.items():
        want = {G.ATTENTION: "tp", G.MOE: "tp", G.EMBEDDING: "vocab", G.NORM: "seq"}.get(kinds[name])
        if want:
            assert p.strategy == want and p.axis == "mp"
    # the all-gather before attention and the reduce-scatter after it are plain reshardings
    kinds_of = {(src, dst) for src, dst, *_ in plan.reshards(g)}
    assert ("layers.0.attention_norm", "layers.0.attention") in kinds_of


def test_ep_dp_plan_is_data_parallel_but_the_experts(graph):
    g = graph("tiny")
    plan = ep_dp_plan(g, MeshConfig(4, 1, 1, 4, 2))
    plan.validate(g, batch=4, seq=128)
    for name, p in plan.ops.items():
        assert (p.strategy, p.axis) == (("ep", "mp") if "feed_forward" in name else ("replicate", None))


def test_planner_beats_megatron_at_scale(graph, h800):
    g = graph("internal-352b")
    planned = search(g, h800, 1440, 720, Options(seq=8192))
    meg = baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=15)
    assert meg.mesh.pp == 15 and meg.mesh.d == 12
    assert planned.breakdown.step < meg.breakdown.step


def test_simulate_rows(graph, h800):
    rows = simulate(graph("tiny"), h800, 8, 32, Options(seq=128))
    names = [r.name for r in rows]
    assert names[0] == "planner" and "megatron" in names and "ep_dp" in names
    best = rows[0].breakdown.step
    assert all(best <= r.breakdown.step * (1 + 1e-9) for r in rows if r.fits)  # the planner's space holds both
    text = table(rows)
    assert "tokens/s" in text and "MFU" in text and "planner" in text


@pytest.mark.parametrize("path", sorted(PLANS.glob("tiny-*.yaml")), ids=lambda p: p.stem)
def test_shipped_tiny_plans_validate_and_price(graph, path):
    g = graph("tiny")
    plan = Plan.from_yaml(path)
    pipe = plan.meta.get("pipeline", {})
    b = pipe.get("micro_batch_size", 1) * plan.mesh.axis_size("dp")
    plan.validate(g, batch=b, seq=128)
    priced = price_plan(g, load_cluster("h800"), plan, 8, Options(seq=128))
    assert priced.breakdown.step > 0 and priced.breakdown.feasible


@pytest.mark.parametrize("name", ["planned", "megatron"])
def test_shipped_352b_plans_validate_and_price(graph, h800, name):
    g = graph("internal-352b")
    plan = Plan.from_yaml(PLANS / f"internal-352b-1440xh800-{name}.yaml")
    plan.validate(g, batch=plan.mesh.axis_size("dp"), seq=8192)
    pipe = plan.meta["pipeline"]
    if name == "megatron":
        assert pipe["stages"] == 15  # REFERENCE.md's PP=15
    else:  # the planner's own depth: every one of the 60 layers in exactly one of its stages
        assert len(pipe["layers_per_stage"]) == pipe["stages"] and sum(pipe["layers_per_stage"]) == 60
    priced = price_plan(g, h800, plan, 720, Options(seq=8192))
    if name == "planned":
        assert priced.breakdown.step == pytest.approx(plan.meta["planner"]["step_time_s"], rel=1e-5)
    else:
        assert priced.breakdown.step == pytest.approx(plan.meta["priced"]["step_time_s"], rel=1e-5)

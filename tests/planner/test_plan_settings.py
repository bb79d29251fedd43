"""Plan settings of Megatron-Core runs (planner/plan_settings.py): selective recompute, interleaved virtual pipeline
stages, MoE parallel folding. Each changes the priced step by its documented cost; Plan.validate refuses the last
two for running (meshplan's runtime has neither), price_plan prices them."""
import dataclasses

import pytest

from meshplan.ir import Plan
from meshplan.ir import graph as G
from meshplan.ir.plan import PlanError
from meshplan.planner import MeshConfig, Options, search
from meshplan.planner.baselines import ep_dp_plan, folded_plan
from meshplan.planner.plan_settings import inflight, selective
from meshplan.planner.plans import bubble, price_plan

SEQ = 4096
OPTS = Options(seq=SEQ, balanced_routing=True)


def _price(g, cluster, mc, build=folded_plan, batch=None):
    plan = build(g, mc)
    return price_plan(g, cluster, plan, batch or mc.d * mc.b * mc.m, OPTS)


@pytest.fixture(scope="module")
def model(graph):
    return graph("mixtral-8x7b", n_layers=8)


def test_interleaved_inflight_matches_megatron_warmup():
    # 1F1B: stage k holds pp - k micro-batches; interleaved, the first stage holds pp + (pp - 1)/v
    assert [inflight(4, k, 16, 1) for k in range(4)] == [4, 3, 2, 1]
    assert inflight(8, 0, 64, 4) == 8 + 7 / 4
    assert inflight(8, 7, 64, 4) == (3 * 8 + 1) / 4
    assert inflight(8, 0, 2, 4) == 2  # never more than the step's micro-batches


def test_virtual_stages_divide_the_bubble_and_multiply_the_sends(model, h100):
    base = MeshConfig(8, 1, 4, 8, 8, fold=1)
    one, four = _price(model, h100, base), _price(model, h100, dataclasses.replace(base, vp=4))
    assert one.problem.bubble_slots == 3 and four.problem.bubble_slots == 0.75
    assert bubble(four.mesh) == pytest.approx(0.75 / 8.75)
    t1, t4 = max(one.breakdown.stage_times), max(four.breakdown.stage_times)
    assert t4 > t1  # four times the stage boundaries per micro-batch
    p2p1 = sum(one.problem.groups[g].choices[c].p2p for g, c in one.assignment.strategy.items())
    p2p4 = sum(four.problem.groups[g].choices[c].p2p for g, c in four.assignment.strategy.items())
    assert p2p4 == pytest.approx(4 * p2p1) and p2p1 > 0
    assert four.breakdown.step == pytest.approx((8 + 0.75) * t4 + four.breakdown.grad_exposed)
    assert four.breakdown.step < one.breakdown.step
    assert max(four.breakdown.memory) > max(one.breakdown.memory)  # more chunks in flight on stage 0


def test_selective_recompute_sits_between_none_and_full(model, h100):
    base = MeshConfig(8, 1, 2, 8, 4, fold=1)
    none = _price(model, h100, base)
    sel = _price(model, h100, dataclasses.replace(base, selective=True))
    full = _price(model, h100, dataclasses.replace(base, recompute=True))
    assert sel.mesh.granularity == "selective" and sel.plan.meta["activation_recompute"] == "selective"
    mem = [max(p.breakdown.memory) for p in (none, sel, full)]
    step = [p.breakdown.step for p in (none, sel, full)]
    assert mem[0] > mem[1] > mem[2]
    assert step[0] < step[1] < step[2]
    # the MoE drops exactly its SwiGLU output (k·t·f, 1/n of it per EP rank) and its copy of the norm output
    moe = next(op for op in model.ops() if op.kind == G.MOE)
    a = moe.attrs
    dropped, rerun, frac = selective(model, moe, "ep", 8, 8, SEQ)
    act = 2 * a["top_k"] * 8 * SEQ * a["ffn_dim"] / 8
    assert dropped == pytest.approx(act + 2 * 8 * SEQ * a["dim"] / 8) and rerun == pytest.approx(3 * act)
    assert frac == 0  # no GEMM reruns: norms and SwiGLU are memory-bound


def test_folding_prices_no_resharding_around_the_experts(model, h100):
    mc = MeshConfig(8, 1, 1, 8, 2)
    plain = _price(model, h100, mc, build=ep_dp_plan)
    folded = _price(model, h100, dataclasses.replace(mc, fold=1))
    def reshards(priced):
        return sum(1 for ei, e in enumerate(priced.problem.edges)
                   if (priced.assignment.strategy[e.src], priced.assignment.strategy[e.dst]) in e.cost)
    assert reshards(plain) > 0 and reshards(folded) == 0  # ep_dp pays the batch <-> sequence all-to-alls
    assert folded.breakdown.step < plain.breakdown.step
    # fold=2: attention is TP on a 2-wide sub-axis, so its resharding collectives are TP's on 2 ranks
    two = _price(model, h100, dataclasses.replace(mc, fold=2))
    attn = next(g for g in two.problem.groups if two.cost_model.groups[g].ops[0].kind == G.ATTENTION)
    assert two.cost_model.group_mesh(attn, two.mesh).n == 2 and two.assignment.strategy[attn] == "tp"
    # the step's breakdown (meshplan simulate --breakdown) prices each group on its own mesh and still adds up
    from meshplan.planner import breakdown
    sel = _price(model, h100, MeshConfig(8, 1, 2, 8, 4, selective=True, vp=2, fold=2))
    parts = breakdown.split(sel.cost_model, sel.mesh, sel.problem, sel.assignment, sel.breakdown)
    assert sum(parts["per_step"].values()) == pytest.approx(sel.breakdown.step)
    assert parts["per_microbatch"]["selective rerun"] > 0 and parts["per_microbatch"]["p2p"] > 0
    with pytest.raises(ValueError, match="attention_width: 3 must divide mp=8"):
        _price(model, h100, dataclasses.replace(mc, fold=3))


def test_selective_recompute_validates_like_full(model):
    # a memory setting: the result is the same computation, so a plan may ask for it like for full recompute
    plan = Plan.from_yaml(ep_dp_plan(model, MeshConfig(8, 1, 2, 8, 4, selective=True)).to_yaml())
    assert plan.meta["activation_recompute"] == "selective"
    plan.validate(model, batch=8, seq=SEQ)


@pytest.mark.parametrize("field, setting", [("pipeline.virtual_stages", dict(vp=2)),
                                            ("moe_folding", dict(fold=1)), ("executor", dict(megatron=True))])
def test_validate_refuses_pricing_only_settings(model, h100, field, setting):
    mc = MeshConfig(8, 1, 2, 8, 4, **setting)
    plan = folded_plan(model, mc) if "fold" in setting else ep_dp_plan(model, mc)
    again = Plan.from_yaml(plan.to_yaml())  # the settings survive the plan file
    with pytest.raises(PlanError, match=rf"^plan\.meta\.{field}: .* priced only"):
        again.validate(model, batch=8, seq=SEQ)
    priced = price_plan(model, h100, again, 32, OPTS)  # simulate still prices it
    assert (priced.mesh.selective, priced.mesh.vp, priced.mesh.fold, priced.mesh.megatron) == (
        setting.get("selective", False), setting.get("vp", 1), setting.get("fold", 0), setting.get("megatron", False))


def test_search_picks_selective_recompute_where_memory_asks(graph, h800):
    g = graph("mixtral-8x7b", n_layers=4)
    def best(recompute):
        return search(g, h800, 8, 16, Options(seq=SEQ, mem_limit=20e9, recompute=recompute))
    auto = best("auto")
    assert auto.mesh.granularity == "selective" and max(auto.breakdown.memory) <= 20e9
    assert auto.breakdown.step < best("never").breakdown.step  # no recompute fits only on a slower mesh
    assert auto.breakdown.step < best("always").breakdown.step  # full recompute reruns the whole forward
    roomy = search(g, h800, 8, 16, Options(seq=SEQ, mem_limit=40e9))
    assert roomy.mesh.granularity == "none"  # selective only where the mesh does not fit without it


def test_pricing_only_search_may_interleave_and_its_plan_is_refused_for_running(graph, h800):
    from meshplan.planner.plans import to_plan
    g = graph("mixtral-8x7b", n_layers=8)
    runnable = search(g, h800, 32, 64, Options(seq=SEQ), pp=[4])
    priced = search(g, h800, 32, 64, Options(seq=SEQ, pricing_only=True), pp=[4])
    assert runnable.mesh.vp == 1 and priced.mesh.vp == 2  # the bubble / 2 outweighs twice the sends
    assert priced.breakdown.step < runnable.breakdown.step
    plan = to_plan(priced.cost_model, priced.mesh, priced.problem, priced.assignment, priced.breakdown, 64)
    assert plan.meta["pipeline"]["virtual_stages"] == 2
    with pytest.raises(PlanError, match=r"^plan\.meta\.pipeline\.virtual_stages: 2 is priced only"):
        plan.validate(g, batch=priced.mesh.b * priced.mesh.d, seq=SEQ)
    plan.validate(g, batch=priced.mesh.b * priced.mesh.d, seq=SEQ, pricing=True)

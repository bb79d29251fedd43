"""Baselines are ordinary Plans, priced by the planner's own model; the shipped tiny plans stay valid."""
import pytest

from meshplan.ir import Plan
from meshplan.ir import graph as G
from meshplan.planner import MeshConfig, Options, search
from meshplan.planner.baselines import baseline, ep_dp_plan, megatron_plan
from meshplan.planner.cluster import load_cluster
from meshplan.planner.mesh_search import PlannerError
from meshplan.planner.plans import price_plan
from meshplan.planner.simulate import simulate, table
from meshplan.resources import shipped

PLANS = shipped("plans")


def _valid_plan(graph, build):
    """A baseline plan of the 2-layer internal-352b on (mp=8, dp=2), validated; (graph, plan, op name -> kind)."""
    g = graph("internal-352b", n_layers=2)
    plan = build(g, MeshConfig(8, 2, 1, 1, 4))
    plan.validate(g, batch=2, seq=8192)
    return g, plan, {op.name: op.kind for op in g.ops()}


def test_megatron_plan_is_tp_with_sequence_parallel(graph):
    g, plan, kinds = _valid_plan(graph, megatron_plan)
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
        assert pipe["stages"] == 15  # docs/reference.md's PP=15
    else:  # the planner's own depth: every one of the 60 layers in exactly one of its stages
        assert len(pipe["layers_per_stage"]) == pipe["stages"] and sum(pipe["layers_per_stage"]) == 60
    priced = price_plan(g, h800, plan, 720, Options(seq=8192))
    if name == "planned":
        assert priced.breakdown.step == pytest.approx(plan.meta["planner"]["step_time_s"], rel=1e-5)
    else:
        assert priced.breakdown.step == pytest.approx(plan.meta["priced"]["step_time_s"], rel=1e-5)


def test_megatron_is_priced_as_run_fp32_grads_and_exposed_tp(graph, h800):
    """Megatron's defaults: FP32 gradient reduce-scatter, TP all-gather/reduce-scatter not overlapped (every
    resharding's exposed time is all of it); with --tp-comm-overlap the same plan is faster, each TP collective
    still exposing at least its first of n chunks."""
    from meshplan.planner.baselines import megatron_plan
    g = graph("internal-352b", n_layers=2)
    mc = MeshConfig(8, 2, 1, 1, 4)
    plain = price_plan(g, h800, megatron_plan(g, mc), 8, Options(seq=8192))
    assert all(p.precision.get("grad", "fp32") == "fp32" for p in plain.plan.ops.values())
    assert plain.plan.meta["tp_comm_overlap"] is False
    assert plain.plan.meta["overlap_grad_reduce"] and plain.plan.meta["overlap_param_gather"]
    assert all(e.floor[k] == e.cost[k] for e in plain.problem.edges for k in e.cost)
    overlapped = price_plan(g, h800, megatron_plan(g, mc, tp_comm_overlap=True), 8, Options(seq=8192))
    assert overlapped.breakdown.step < plain.breakdown.step
    floors = [(e.floor[k][dt], t) for e in overlapped.problem.edges for k in e.cost for dt, t in e.cost[k].items()]
    assert any(f < t for f, t in floors) and all(f >= t / mc.n - 1e-15 for f, t in floors)


def test_megascale_plan_is_sp_attention_ep_moe_bf16_grads(graph):
    from meshplan.planner.baselines import megascale_plan
    g, plan, kinds = _valid_plan(graph, megascale_plan)
    for name, p in plan.ops.items():
        want = {G.ATTENTION: "sp", G.MOE: "ep"}.get(kinds[name])
        if want:
            assert p.strategy == want
        if "grad" in p.precision:
            assert p.precision["grad"] == "bf16"


def test_breakdown_parts_add_up_to_the_step(graph, h800):
    from meshplan.planner import breakdown
    rows = simulate(graph("tiny"), h800, 8, 32, Options(seq=128))
    for r in rows:
        if r.parts:
            # compute kinds + exposed collectives never exceed the stage time: p2p (the rest) is what sends cost
            assert r.parts["per_microbatch"]["p2p"] >= -1e-12
            assert sum(r.parts["per_step"].values()) == pytest.approx(r.breakdown.step)
            assert "gemm" in breakdown.table(r.name, r.parts)


def test_fixed_recompute_is_kept_across_scales(graph, h800):
    """A baseline whose user turned recompute on keeps it at a scale where it would fit without (no knife edge)."""
    g = graph("internal-352b")
    on = baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=15, recompute="full")
    free = baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=15)
    assert on.mesh.recompute and not free.mesh.recompute
    sel = baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=15, recompute="selective")
    assert sel.mesh.granularity == "selective"


def test_simulate_numbers_by_hand(graph, h800):
    """tokens/s, MFU and bubble of simulate's rows recomputed here from the tiny model's sizes (configs/models/
    tiny.yaml) and the textbook formulas, not from the pricing code: forward FLOPs per token are 2 x the
    active matmul weights plus causal attention's 2*S*Hq*hd (QK^T and AV, half each), training 3x forward;
    MFU = training FLOPs / (GPUs x peak x step); the 1F1B bubble (pp - 1) / (m + pp - 1).
    Mutations tried (benchmarks/mutations.py mfu-per-gpu, tokens-per-microbatch): MFU's denominator without the
    GPU count: fails; tokens/s from one micro-batch instead of the global batch: fails."""
    d, hq, hkv, hd, f, e, k, v, layers, seq, batch, gpus = 64, 4, 2, 16, 128, 4, 2, 256, 2, 128, 32, 8
    attention = 2 * d * (hq + 2 * hkv) * hd + 2 * hq * hd * d + 2 * seq * hq * hd
    moe = 2 * d * e + k * 6 * d * f
    per_token = layers * (attention + moe) + 2 * d * v  # + norms and adds: O(D) per token, < 1% here
    train_flops = 3 * per_token * batch * seq
    rows = simulate(graph("tiny"), h800, gpus, batch, Options(seq=seq))
    assert len(rows) >= 3
    fitting = [r.to_dict() for r in rows if r.to_dict()["fits"]]  # a fixed-depth baseline may not fit 8 GPUs
    assert len(fitting) >= 3
    for d_ in fitting:
        step = d_["step_time_s"]
        assert d_["tokens_per_s"] == pytest.approx(batch * seq / step, rel=1e-12)
        assert d_["mfu"] == pytest.approx(train_flops / (gpus * 989e12 * step), rel=0.01)  # h800: 989 TFLOP/s
        pp, m = d_["pp"], d_["microbatches"]
        assert d_["bubble"] == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
        assert pp * d_["dp"] * d_["mp"] == gpus and d_["micro_batch"] * m * d_["dp"] == batch
        assert 0 < d_["memory_gb"] < 80 and d_["fits"]


def test_megatron_interleaved_row_prices_virtual_stages(graph, h800):
    """Megatron at pp=15 with 4 virtual stages per rank (priced only): a quarter of the bubble, still slower than
    the planner's runnable pick; a depth whose layers do not split into pp x 4 chunks has no such row."""
    g = graph("internal-352b")
    plain = baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=15, recompute="selective")
    inter = baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=15, recompute="selective", vp=4)
    assert inter.mesh.vp == 4 and inter.plan.meta["pipeline"]["virtual_stages"] == 4
    assert inter.problem.bubble_slots == pytest.approx(14 / 4)
    assert inter.breakdown.step < plain.breakdown.step
    with pytest.raises(PlannerError, match="no pipeline depth divides"):
        baseline("megatron", g, h800, 1440, 720, Options(seq=8192), pp=12, vp=4)  # 60 layers != 12 x 4 chunks
    rows = simulate(g, h800, 1440, 720, Options(seq=8192), baseline_recompute={"megatron": "selective"})
    planner = rows[0].breakdown.step
    assert any(r.mesh.vp == 4 for r in rows)
    assert all(planner <= r.breakdown.step for r in rows if r.fits)


def test_megascale_on_its_own_system_overlaps_what_meshplan_does_not(graph, h800):
    """The MegaScale-style row runs on meshplan's schedule (like for like), and loses to the planner's pick; on
    MegaScale-MoE's own overlaps (compressed all-to-alls chunked too, TP and the parameter gather overlapped) the
    same plan is faster than the planner's pick at 1440 GPUs: what meshplan's runtime leaves exposed."""
    from meshplan.planner.baselines import megascale_plan
    g = graph("internal-352b")
    rows = simulate(g, h800, 1440, 720, Options(seq=8192), baseline_recompute={"megatron": "selective"})
    planner, ms = rows[0], next(r for r in rows if r.name == "megascale")
    own = price_plan(g, h800, megascale_plan(g, ms.mesh, own_system=True), 720, Options(seq=8192))
    assert own.breakdown.step < planner.breakdown.step <= ms.breakdown.step

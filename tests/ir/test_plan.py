"""Plans: random valid plans round-trip through YAML unchanged; invalid ones fail with the field named."""
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshplan.ir import Mesh, Partial, Plan, PlanError, Replicate, Shard, trace
from meshplan.ir import graph as G
from meshplan.ir.strategies import STRATEGIES, allowed_precisions, collective_names, divisibility_error
from meshplan.models import ModelConfig, build_model

CONFIGS = [
    dict(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=32, n_experts=4, top_k=2),
    dict(dim=48, n_heads=6, n_kv_heads=1, ffn_dim=24, n_experts=6, top_k=1, n_shared_experts=1),
    dict(dim=32, n_heads=8, n_kv_heads=8, ffn_dim=16, n_experts=8, top_k=3, n_dense_layers=1, dense_ffn_dim=64),
]
MESHES = [Mesh.of(dp=1), Mesh.of(mp=2), Mesh.of(dp=2, mp=2), Mesh.of(mp=4), Mesh.of(dp=2, mp=3), Mesh.of(pp=1, ep=8)]


@functools.lru_cache(maxsize=None)
def graph_of(i: int):
    return trace(build_model(ModelConfig(n_layers=2, vocab_size=64, **CONFIGS[i]), device="meta"))


@st.composite
def valid_plans(draw):
    g = graph_of(draw(st.integers(0, len(CONFIGS) - 1)))
    mesh = draw(st.sampled_from(MESHES))
    axis = draw(st.sampled_from(mesh.names))
    size = mesh.axis_size(axis)
    choice = {}
    for op in g.ops():
        if op.kind in (G.INPUT, G.OUTPUT):
            continue
        ok = [s for s in STRATEGIES[op.kind] if divisibility_error(op, s, axis, size) is None]
        choice[op.name] = draw(st.sampled_from(ok))
    plan = Plan.build(g, mesh, choice, axis=axis)
    for name, p in plan.ops.items():
        op = g.op(name)
        for c in collective_names(op, p.strategy):
            if draw(st.booleans()):
                p.precision[c] = draw(st.sampled_from(allowed_precisions(c)))
    return g, plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_plans())
def test_valid_plans_round_trip(gp):
    g, plan = gp
    plan.validate(g)
    text = plan.to_yaml()
    again = Plan.from_yaml(text)
    assert again == plan
    assert again.to_yaml() == text
    again.validate(g)


def _mutations(g, plan):
    """(description, mutate(plan) -> None, text the error must contain)."""
    attn = "layers.0.attention"
    moe = "layers.1.feed_forward"

    def set_(name, **kw):
        def f(p):
            for k, v in kw.items():
                setattr(p.ops[name], k, v)
        return f

    return [
        ("strategy not valid for op", set_(attn, strategy="ep"), f"plan.ops['{attn}'].strategy: 'ep' is not valid"),
        ("unknown axis", set_(attn, axis="zz"), f"plan.ops['{attn}'].axis: 'zz' is not a mesh axis"),
        ("wrong placement on model axis", set_(attn, output=tuple(
            Shard(2) if a == plan.ops[attn].axis else p for a, p in zip(plan.mesh.names, plan.ops[attn].output))),
         f"plan.ops['{attn}']: on its model axis"),
        ("unknown op", lambda p: p.ops.__setitem__("layers.9.attention", p.ops[attn]),
         "plan.ops['layers.9.attention']: no such op"),
        ("missing op", lambda p: p.ops.pop(moe), f"plan.ops['{moe}']: missing"),
        ("bad precision value", lambda p: p.ops[moe].precision.__setitem__("grad", "fp8"),
         f"plan.ops['{moe}'].precision.grad: 'fp8' not allowed"),
        ("unknown collective", lambda p: p.ops[attn].precision.__setitem__("dispatch", "bf16"),
         f"plan.ops['{attn}'].precision.dispatch: no such collective"),
    ]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_plans(), st.integers(0, 6))
def test_invalid_plans_name_the_field(gp, k):
    g, plan = gp
    desc, mutate, needle = _mutations(g, plan)[k]
    mutate(plan)
    with pytest.raises(PlanError) as e:
        Plan.from_yaml(plan.to_yaml()).validate(g)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("mesh,needle", [
    (Mesh.of(mp=3), "mesh axis mp=3 does not divide n_heads=4"),
    (Mesh.of(dp=2, mp=8), "mesh axis mp=8 does not divide n_heads=4"),
])
def test_mesh_must_divide_heads(mesh, needle):
    g = graph_of(0)
    with pytest.raises(PlanError, match=needle):
        Plan.build(g, mesh, {"attention": "tp"}).validate(g)


def test_experts_and_sequence_divisibility():
    g = graph_of(0)  # 4 experts
    with pytest.raises(PlanError, match="mesh axis ep=8 does not divide n_experts=4"):
        Plan.build(g, Mesh.of(ep=8), {"attention": "replicate", "moe": "ep"}).validate(g)
    plan = Plan.build(g, Mesh.of(dp=2, mp=2), {"attention": "sp", "moe": "ep"})
    plan.validate(g, batch=4, seq=16)
    with pytest.raises(PlanError, match="mesh axis mp=2 does not divide the sequence length 15"):
        plan.validate(g, batch=4, seq=15)
    with pytest.raises(PlanError, match="mesh axis dp=2 does not divide the batch size 3"):
        plan.validate(g, batch=3, seq=16)


@pytest.mark.parametrize("text,needle", [
    ("model: x\nmesh: {dp: 0}\nops: {}\n", "plan.mesh.axes.dp: size must be a positive integer"),
    ("model: x\nmesh: {dp: 2}\nops: {a: {strategy: seq, input: [S(0)], output: [X]}}\n",
     "plan.ops['a'].output: not a placement: 'X'"),
    ("model: x\nmesh: {dp: 2, mp: 2}\nops: {a: {strategy: seq, input: [S(0)], output: [S(0), S(1)]}}\n",
     "plan.ops['a'].input: expected a list of 2 placements"),
    ("model: x\nmesh: {dp: 2}\nops: {a: {strategy: seq, input: [R], output: [R], colour: red}}\n",
     "plan.ops['a'].colour: unknown field"),
    ("model: x\nops: {}\n", "plan.mesh: missing"),
    ("!!python/object:os.system ls\n", "plan: not valid YAML"),
])
def test_malformed_yaml(text, needle):
    with pytest.raises(PlanError) as e:
        Plan.from_yaml(text)
    assert needle in str(e.value)


def test_reshards_follow_placements():
    g = graph_of(0)
    plan = Plan.build(g, Mesh.of(dp=2, mp=2), {"attention": "tp", "moe": "ep"})
    edges = {(src, dst): (a, b) for src, dst, _, a, b in plan.reshards(g)}
    # TP attention: all-gather its sequence-sharded input, reduce-scatter its partial output into the residual add
    assert edges[("layers.0.attention_norm", "layers.0.attention")] == ((Shard(0), Shard(1)), (Shard(0), Replicate()))
    assert edges[("layers.0.attention", "layers.0.add")] == ((Shard(0), Partial()), (Shard(0), Shard(1)))
    assert len(edges) == 4  # two per layer; EP's all-to-alls live inside the op


def test_pure_data_parallel_plan_and_multi_axis_divisibility():
    g = graph_of(0)
    plan = Plan.build(g, Mesh.of(dp=2, mp=2), axis=None)
    assert all(p.axis is None and p.input == (Shard(0), Shard(0)) for p in plan.ops.values())
    plan.validate(g, batch=4, seq=7)  # batch split 2 x 2 = 4 ways; sequence not split
    with pytest.raises(PlanError, match=r"\.input: mesh axis dp=2 x mp=2 does not divide the batch size 6"):
        plan.validate(g, batch=6, seq=7)

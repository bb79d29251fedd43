"""Collective precisions a plan chooses: bf16/fp8 on the wire, float32 sums, numerics close to float32, fewer bytes."""
import pytest
import torch
from rt_harness import batch_for, loss_of, make_model, reference, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.runtime import LocalWorld, ParallelModel


def _run(cfg, graph, plan, tokens, targets):
    world = LocalWorld(plan.mesh.size)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        loss = loss_of(pm(tokens), targets)
        loss.backward()
        pm.reduce_gradients()
        stats = pm.comm_stats  # activations only: no gradient reduction, and not the logits' final gather
        return loss.item(), pm.full_grads(), stats.total() - stats.total(phase="grad") - stats.total(op="return")

    return world.run(rank)


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("wire,loss_rtol,min_cosine,max_bytes_ratio", [
    ("bf16", 2e-3, 0.999, 0.51),
    ("fp8", 2e-2, 0.99, 0.40),  # 1 byte per element plus a float32 scale per row of 16
])
@pytest.mark.parametrize("attention,moe", [("sp", "ep"), ("tp", "tp")])
def test_activation_collectives_in_low_precision(wire, loss_rtol, min_cosine, max_bytes_ratio, attention, moe):
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    tokens, targets = batch_for(cfg, 4, 8)
    ref_loss, ref_grads = reference(cfg, "lm", tokens, targets)
    mesh = Mesh.of(dp=2, mp=2)
    names = ("in0", "in1", "qkv_a2a", "out_a2a", "dispatch", "combine")
    exact = _run(cfg, graph, uniform_plan(graph, mesh, {"attention": attention, "moe": moe}), tokens, targets)
    plan = uniform_plan(graph, mesh, {"attention": attention, "moe": moe}, precision={c: wire for c in names})
    low = _run(cfg, graph, plan, tokens, targets)
    for loss, grads, nbytes in low:
        assert loss == pytest.approx(ref_loss, rel=loss_rtol)
        for name, ref in ref_grads.items():
            assert _cosine(grads[name], ref) > min_cosine, name
    assert low[0][2] / exact[0][2] < max_bytes_ratio


def test_bf16_gradient_reduction_is_close_and_summed_in_fp32():
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    tokens, targets = batch_for(cfg, 4, 8)
    _, ref_grads = reference(cfg, "lm", tokens, targets)
    plan = uniform_plan(graph, Mesh.of(dp=2, mp=2), {"attention": "sp", "moe": "ep"}, precision={"grad": "bf16"})
    for _, grads, _ in _run(cfg, graph, plan, tokens, targets):
        for name, ref in ref_grads.items():
            # each rank's partial gradient is rounded to bf16 once; the sum is exact in float32
            assert torch.allclose(grads[name], ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item()), name

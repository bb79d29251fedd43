"""Collective precisions a plan chooses: bf16/fp8 on the wire, float32 sums, numerics close to float32, fewer bytes."""
import pytest
import torch
import torch.nn.functional as F
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


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def test_bf16_gradient_reduction_is_close_and_summed_in_fp32():
    """4 data-parallel ranks, gradients exchanged in bf16: each rank's local gradient is rounded to bf16 once and
    the 4 are summed in float32, then rounded once: the result is bf16(sum_r bf16(g_r)), with g_r rank r's share
    of the gradient (its sequence's summed loss / all tokens) computed here on one device. Float32 noise between
    the two computations could move a value across a bf16 rounding boundary (measured: 0 of 35,232 elements
    differ); a bf16 running sum (3 more roundings) changes 10,936 of them (31%). Size-2 axes could not tell the two
    apart (a sum of two bf16 values is rounded once either way), hence dp=4.
    Mutation tried: _reduce_bf16's `recv.float().sum(0)` -> `sum(recv.unbind(0))` (a bf16 running sum): fails."""
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    tokens, targets = batch_for(cfg, 4, 8)
    model = make_model(cfg)
    shares = []
    for r in range(4):
        model.zero_grad()
        out = model(tokens[r : r + 1])
        (F.cross_entropy(out.flatten(0, 1), targets[r].flatten(), reduction="sum") / targets.numel()).backward()
        shares.append({n: p.grad.clone() for n, p in model.named_parameters()})
    want = {n: _bf16(sum(_bf16(s[n]) for s in shares)) for n in shares[0]}
    plan = uniform_plan(graph, Mesh.of(dp=4), {}, axis=None, precision={"grad": "bf16"})
    for _, grads, _ in _run(cfg, graph, plan, tokens, targets):
        off = sum(int((~torch.isclose(grads[n], w, rtol=1e-6, atol=0)).sum()) for n, w in want.items())
        total = sum(w.numel() for w in want.values())
        assert off / total < 0.01, f"{off} of {total} gradient elements differ from bf16(sum of bf16 shares)"

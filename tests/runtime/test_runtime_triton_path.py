"""The runtime on codegen's Triton kernels (the path CUDA runs): grouped SwiGLU GEMMs for the experts, the fused
un-permute + weighted combine, the fused permute + FP8 quantise for FP8 dispatch. Here the kernels run in Triton's
CPU interpreter (MESHPLAN_KERNELS=triton); every plan must still compute the single-device loss and gradients."""
import pytest
import torch
from rt_harness import batch_for, check_threads, make_model, mismatches, rank_step, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.kernels import triton_available
from meshplan.runtime import LocalWorld, ParallelModel, moe_kernels

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture
def triton_kernels(monkeypatch):
    calls = {"run_experts": 0, "combine": 0}
    real = moe_kernels.use_triton

    def counting(x, op):
        on = real(x, op)
        calls[op] += on
        return on

    monkeypatch.setenv("MESHPLAN_KERNELS", "triton")
    monkeypatch.setattr(moe_kernels, "use_triton", counting)
    import meshplan.runtime.moe_routing as routing
    monkeypatch.setattr(routing, "use_triton", counting)
    return calls


@pytest.mark.parametrize("moe,capacity_factor", [("ep", None), ("ep", 0.5), ("tp", None), ("ag_scatter", 1.0)])
def test_moe_strategies_on_triton_kernels(triton_kernels, moe, capacity_factor):
    cfg = tiny_config(n_shared_experts=1, capacity_factor=capacity_factor)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, Mesh.of(mp=2), {"attention": "sp", "moe": moe, "ffn": "tp"})
    assert check_threads(cfg, plan, graph=graph, rtol=1e-4, atol=1e-5) == []
    # both MoE layers, forward, on both ranks, went through the kernels
    assert triton_kernels["run_experts"] >= 4 and triton_kernels["combine"] >= 4


def test_fp8_dispatch_same_on_both_paths(triton_kernels, monkeypatch):
    """FP8 dispatch is lossy, so not the single-device numbers: but the fused permute + quantise kernel is
    bit-exact to its reference, so the Triton path gives the torch path's loss and gradients."""
    cfg = tiny_config(n_shared_experts=1)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"}, precision={"dispatch": "fp8"})
    tokens, targets = batch_for(cfg, 4, 8)

    def run():
        world = LocalWorld(2, timeout_s=30)
        groups = world.groups(plan.mesh)
        return world.run(lambda r: rank_step(ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r]),
                                             tokens, targets))

    on_triton = run()
    monkeypatch.setenv("MESHPLAN_KERNELS", "torch")
    on_torch = run()
    for (loss, grads), (ref_loss, ref_grads) in zip(on_triton, on_torch):
        assert mismatches(loss, grads, ref_loss, ref_grads, rtol=1e-4, atol=1e-5) == []
    assert triton_kernels["run_experts"] >= 4


def test_experts_backward_matches_reference_with_an_empty_expert(triton_kernels):
    g = torch.Generator().manual_seed(0)
    E, D, F = 3, 16, 24
    w1, w3 = (torch.randn(E, F, D, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, D, F, generator=g, requires_grad=True)
    x = torch.randn(11, D, generator=g, requires_grad=True)
    expert = torch.tensor([2, 0, 2, 2, 0, 0, 2, 0, 2, 2, 0])  # expert 1 gets no rows
    from meshplan.runtime.moe_routing import run_experts

    y = run_experts(w1, w3, w2, expert, x)
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x, w1, w3, w2], gy)
    with torch.enable_grad():
        ref = torch.stack([(torch.nn.functional.silu(x[i] @ w1[e].T) * (x[i] @ w3[e].T)) @ w2[e].T
                           for i, e in enumerate(expert.tolist())])
    ref_grads = torch.autograd.grad(ref, [x, w1, w3, w2], gy)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # float32, other summation orders
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert triton_kernels["run_experts"] == 1

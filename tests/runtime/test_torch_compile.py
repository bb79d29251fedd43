"""ParallelModel(compile=True): every op, MoE layers included, runs as a torch.compile(fullgraph=True) graph with its
funcol collectives inside, and each step gives the single device's loss and gradients and the eager step's bytes,
over batches whose routings differ, with no recompilation after the first step."""
import pytest
import torch
from rt_harness import MESHES, batch_for, make_model, mismatches, rank_step, reference, tiny_config, uniform_plan
from torch._dynamo.utils import counters

from meshplan.ir import graph as G
from meshplan.ir import trace
from meshplan.ir.plan import PlanError
from meshplan.kernels import triton_available
from meshplan.runtime import LocalWorld, ParallelModel, moe_kernels
from meshplan.runtime.moe_routing import run_experts

# (strategies, mesh, config overrides): SP attention + EP MoE (uneven all-to-alls with SymInt splits), TP
# everywhere (every expert split on its hidden dim), ag_scatter (a data-dependent mask of each rank's assignments),
# dropless and capacity-limited routing, shared experts.
CASES = {
    "sp/ep dropless shared dp2xmp2": ({"attention": "sp", "moe": "ep"}, "dp2,mp2", dict(n_shared_experts=1)),
    "sp/ep capacity": ({"attention": "sp", "moe": "ep"}, "2", dict(capacity_factor=1.0)),
    "tp/tp capacity": ({"attention": "tp", "moe": "tp"}, "2", dict(capacity_factor=1.0)),
    "ag_scatter capacity shared": ({"attention": "sp", "moe": "ag_scatter"}, "2",
                                   dict(capacity_factor=1.5, n_shared_experts=1)),
}
SEEDS = (1, 2, 3)  # three batches: three routings


def _step(pm: ParallelModel, tokens, targets):
    for p in pm.parameters():
        p.grad = None
    pm.comm_stats.reset()
    loss, grads = rank_step(pm, tokens, targets)
    return loss, grads, dict(pm.comm_stats.bytes), dict(pm.comm_stats.calls)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_steps_equal_eager_and_do_not_recompile(case):
    strategies, mesh, over = CASES[case]
    cfg = tiny_config(n_layers=1, **over)  # one MoE block: every op kind the plans compile, once
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES[mesh], strategies)
    batches = [batch_for(cfg, 4, 8, seed) for seed in SEEDS]
    refs = [reference(cfg, "lm", *b) for b in batches]
    world = LocalWorld(plan.mesh.size, timeout_s=300)
    groups = world.groups(plan.mesh)
    models = {}

    def rank(r, seeds):
        if r not in models:
            models[r] = [ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r], compile=c)
                         for c in (False, True)]
        return [[_step(pm, *batches[i]) for pm in models[r]] for i in seeds]

    first = world.run(lambda r: rank(r, [0]))  # compiles every op (each rank its own graphs)
    graphs = counters["stats"]["unique_graphs"]
    rest = world.run(lambda r: rank(r, [1, 2]))
    assert counters["stats"]["unique_graphs"] == graphs, "a new routing recompiled an op"

    moe = next(graph.ops(G.MOE)).name
    expert_bytes = set()
    for r in range(plan.mesh.size):
        compiled_ops = models[r][1]._compiled
        assert moe in compiled_ops and compiled_ops[moe].calls == len(SEEDS)
        for i, (eager, compiled) in enumerate(first[r] + rest[r]):
            loss, grads, nbytes, calls = compiled
            assert not mismatches(loss, grads, *refs[i]), (r, i, mismatches(loss, grads, *refs[i]))
            assert nbytes == eager[2] and calls == eager[3], (r, i)
            expert_bytes.add(tuple(sorted((k.tag, v) for k, v in nbytes.items() if k.op == moe)))
    if strategies["moe"] == "ep":  # the uneven all-to-alls sent different bytes for different routings
        assert len({tuple(v for t, v in b if t == "dispatch") for b in expert_bytes}) > 1


def test_compile_refuses_a_compressed_channel():
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["1"], {"attention": "sp", "ffn": "tp", "moe": "ep"}, precision={"in0": "bf16"})
    with pytest.raises(PlanError, match=r"precision \{'in0': 'bf16'\}: compile=True supports fp32"):
        ParallelModel(make_model(cfg), plan, graph=graph, compile=True)
    ParallelModel(make_model(cfg), plan, graph=graph)  # eager runs it


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_compiled_experts_trace_torch_where_eager_runs_triton(monkeypatch):
    """Under MESHPLAN_KERNELS=triton (the path CUDA takes) eager run_experts launches the grouped Triton kernels;
    a compiled one traces the torch per-expert GEMMs (with an empty expert) and gives the same rows and gradients."""
    monkeypatch.setenv("MESHPLAN_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(3, 24, 16, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(3, 16, 24, generator=g, requires_grad=True)
    x = torch.randn(11, 16, generator=g, requires_grad=True)
    expert = torch.tensor([2, 0, 2, 2, 0, 0, 2, 0, 2, 2, 0])  # expert 1 gets no rows
    assert moe_kernels.use_triton(x, "run_experts")
    gy = torch.randn(11, 16, generator=g)
    eager = run_experts(w1, w3, w2, expert, x)
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        traced = torch.compile(run_experts, fullgraph=True, backend="aot_eager")(w1, w3, w2, expert, x)
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-4)  # float32, other summation orders
    for got, want in zip(torch.autograd.grad(traced, [x, w1, w3, w2], gy),
                         torch.autograd.grad(eager, [x, w1, w3, w2], gy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

"""ParallelModel(compile=True): every op but the MoE layers runs as a torch.compile(fullgraph=True) graph with its
funcol collectives inside, and a step gives the eager step's loss, gradients and bytes."""
import pytest
from rt_harness import MESHES, batch_for, make_model, mismatches, rank_step, reference, tiny_config, uniform_plan

from meshplan.ir import trace
from meshplan.ir.plan import PlanError
from meshplan.runtime import LocalWorld, ParallelModel

# SP attention (all-to-alls inside the compiled op), TP dense FFN, EP MoE (eager: data-dependent splits)
STRATEGIES = {"attention": "sp", "ffn": "tp", "moe": "ep"}


def _steps(pm: ParallelModel, tokens, targets, n: int):
    out = []
    for _ in range(n):
        for p in pm.parameters():
            p.grad = None
        pm.comm_stats.reset()
        loss, grads = rank_step(pm, tokens, targets)
        out.append((loss, grads, dict(pm.comm_stats.bytes), dict(pm.comm_stats.calls)))
    return out


@pytest.mark.parametrize("attention", ["sp", "tp"])
def test_compiled_step_equals_eager(attention):
    cfg = tiny_config(n_dense_layers=1, n_layers=2)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["2"], {**STRATEGIES, "attention": attention})
    tokens, targets = batch_for(cfg, 4, 8)
    ref_loss, ref_grads = reference(cfg, "lm", tokens, targets)
    world = LocalWorld(2, timeout_s=300)
    groups = world.groups(plan.mesh)

    def rank(r):
        eager = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        compiled = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r], compile=True)
        # step 1 runs each op eagerly once (to book its bytes), step 2 compiles, step 3 reuses the graphs
        steps = _steps(compiled, tokens, targets, 3)
        calls = {name: op.compiled_calls for name, op in compiled._compiled.items()}
        return _steps(eager, tokens, targets, 1)[0], steps, calls

    for r, (eager, steps, compiled_calls) in enumerate(world.run(rank)):
        # steps 2 and 3 ran every op but the MoE layer and the generic adds through its compiled graph
        assert {n.split(".")[-1] for n in compiled_calls} >= {"attention", "feed_forward", "attention_norm"}
        assert not any(n == "layers.1.feed_forward" for n in compiled_calls)  # the EP MoE layer: eager
        assert set(compiled_calls.values()) == {2}, compiled_calls
        for i, (loss, grads, nbytes, calls) in enumerate(steps):
            assert not mismatches(loss, grads, ref_loss, ref_grads), (r, i)
            assert nbytes == eager[2] and calls == eager[3], (r, i)
    assert any(k.op.endswith("attention") for k in eager[2]) and any(k.op.endswith("feed_forward") for k in eager[2])


def test_compile_refuses_a_compressed_channel():
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["1"], STRATEGIES, precision={"in0": "bf16"})
    with pytest.raises(PlanError, match=r"precision \{'in0': 'bf16'\}: compile=True supports fp32"):
        ParallelModel(make_model(cfg), plan, graph=graph, compile=True)
    ParallelModel(make_model(cfg), plan, graph=graph)  # eager runs it

"""Run an adapted HF model under a plan on an in-process thread world and compare with HF on one process."""
from __future__ import annotations

import torch
from hf_models import batch, hf_model, hf_reference, loss_of

import meshplan
from meshplan.hf import adapt
from meshplan.ir import Mesh, Plan, trace
from meshplan.runtime import LocalWorld, ParallelModel

LOSS_TOL, GRAD_RTOL = 1e-5, 1e-4


def forced_plan(family: str, strategies: dict[str, str], world: int = 2, **over):
    front = adapt(hf_model(family, **over))
    graph = trace(front, (batch()[0],))
    return graph, Plan.build(graph, Mesh.of(mp=world), strategies)


def auto_plan(family: str, world: int = 2, cluster: str = "local", shape: tuple[int, int] | None = None,
              mesh: Mesh | None = None, **over):
    """The planner's plan (compile on no process group), planned for a [B, S] batch of `shape` (default: the
    test batch); the plan runs on the test batch all the same (it is shape-generic)."""
    tokens = batch()[0] if shape is None else torch.zeros(shape, dtype=torch.long)
    # error_budget=0: the planner may not trade exactness for bandwidth (bf16/fp8 collectives)
    cm = meshplan.compile(hf_model(family, **over), cluster=cluster, world_size=world, example_inputs=(tokens,),
                          error_budget=0.0, mesh=mesh)
    return cm.graph, cm.plan


def run_threads(family: str, graph, plan: Plan, overlap_chunks: int = 0, compile: bool = False, **over) -> list[str]:
    """Every rank's loss and full gradients (by HF name) against HF's own model on one process. overlap_chunks:
    run the emitted overlap code (codegen) with that many micro-batch chunks; compile: ParallelModel(compile=True)."""
    tokens, targets = batch()
    ref_loss, ref_grads = hf_reference(family, tokens, targets, **over)
    fronts = [adapt(hf_model(family, **over)) for _ in range(plan.mesh.size)]
    world = LocalWorld(plan.mesh.size, timeout_s=300 if compile else 60)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(fronts[r], plan, graph=graph, groups=groups[r], compile=compile)
        if overlap_chunks:
            from meshplan.runtime.overlap import enable_overlap

            enable_overlap(pm, *tokens.shape, chunks=overlap_chunks)
            assert pm.op_overrides
        loss = loss_of(pm(tokens), targets)
        loss.backward()
        pm.reduce_gradients()
        return loss.item(), {fronts[r].hf_names[n]: g for n, g in pm.full_grads().items()}

    bad = []
    for r, (loss, grads) in enumerate(world.run(rank)):
        if abs(loss - ref_loss) >= LOSS_TOL:
            bad.append(f"rank {r}: loss {loss} != {ref_loss}")
        if set(grads) != set(ref_grads):
            bad.append(f"rank {r}: gradient names differ: {sorted(set(grads) ^ set(ref_grads))[:4]}")
        for name, ref in ref_grads.items():
            g = grads.get(name)
            if g is None:
                continue
            err, top = (g - ref).abs().max().item(), ref.abs().max().item()
            if err > GRAD_RTOL * top + 1e-7:
                bad.append(f"rank {r}: grad {name}: max err {err:.3g} (max |ref| {top:.3g})")
    return bad

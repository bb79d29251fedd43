"""The planner's per-rank parameter count (planner/memory.param_split) equals the elements the runtime holds, for
every strategy of every op kind on a small MoE model with shared experts, on a 2-rank model axis.

Found by it: under ag_scatter the planner split the shared experts like TP while the runtime holds them whole
(runtime/sharding.py splits only the routed experts)."""
import pytest
import sympy
from rt_harness import tiny_config

from meshplan.ir import Mesh, Plan, trace
from meshplan.ir.strategies import STRATEGIES, divisibility_error
from meshplan.models import build_model
from meshplan.planner.memory import N, param_split
from meshplan.runtime import LocalWorld, ParallelModel

N_RANKS = 2


def _plans(graph, mesh):
    """One plan per (kind, strategy) that the mesh divides: that kind's ops take it, the rest keep their default."""
    for kind, strategies in STRATEGIES.items():
        ops = [op for op in graph.ops() if op.kind == kind and op.params]
        for s in strategies:
            if ops and all(divisibility_error(op, s, "mp", N_RANKS) is None for op in ops):
                yield kind, s


@pytest.mark.parametrize("shared", [0, 1])
def test_planner_counts_what_each_rank_holds(shared):
    cfg = tiny_config(n_shared_experts=shared)
    graph = trace(build_model(cfg))
    mesh = Mesh.of(mp=N_RANKS)
    world = LocalWorld(N_RANKS)
    groups = world.groups(mesh)
    checked = 0
    for kind, strategy in _plans(graph, mesh):
        plan = Plan.build(graph, mesh, {kind: strategy})

        def held(r, plan=plan):
            pm = ParallelModel(build_model(cfg), plan, graph=graph, groups=groups[r])
            return {name: p.to_local().numel() for name, p in pm.named_parameters()}

        per_rank = world.run(held)
        for op in graph.ops():
            if op.kind != kind or not op.params:
                continue
            split, replicated = param_split(op, strategy)
            want = int(sympy.sympify(split + replicated).subs(N, N_RANKS))
            for r, numels in enumerate(per_rank):
                got = sum(v for name, v in numels.items() if name.startswith(op.name + "."))
                assert got == want, f"{op.name} {strategy} rank {r}: runtime holds {got}, planner counts {want}"
            checked += 1
    assert checked >= 10  # attention, moe, ffn/linear, embedding strategies all seen

"""Plans that cannot run are rejected with a PlanError naming both numbers, before any collective.

"Before any collective" is checked by handing ParallelModel process groups that have no communicator at all (the
ranks of a world that does not exist): any attempt to communicate would fail with something other than PlanError.
"""
import pytest
import torch
from rt_harness import make_model, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.ir.plan import PlanError
from meshplan.runtime import LocalWorld, MeshGroups, ParallelModel
from meshplan.runtime.process_groups import AxisGroup


def _groups_without_communicators(mesh: Mesh, rank: int = 0) -> MeshGroups:
    coords = mesh.coords(rank)
    axes = {n: AxisGroup(n, s, coords[n], tuple(next(g for g in mesh.groups(n) if rank in g)), None)
            for n, s in mesh.axes}
    return MeshGroups(mesh, rank, axes, torch.device("cpu"), "none")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(n_heads=4, n_kv_heads=2, n_experts=4)
    return cfg, trace(make_model(cfg))


def test_mesh_larger_than_world(tiny):
    cfg, graph = tiny
    plan = uniform_plan(graph, Mesh.of(dp=2, mp=2), {})
    with pytest.raises(PlanError, match=r"needs 4 ranks, but the world has 1"):
        ParallelModel(make_model(cfg), plan, graph=graph)  # no torch.distributed: a world of one


def test_mesh_smaller_than_world(tiny):
    cfg, graph = tiny
    plan = uniform_plan(graph, Mesh.of(mp=2), {})
    groups = _groups_without_communicators(Mesh.of(mp=4), 1)
    with pytest.raises(PlanError, match=r"needs 2 ranks, but the world has 4"):
        ParallelModel(make_model(cfg), plan, graph=graph, groups=groups)


@pytest.mark.parametrize("strategies,message", [
    ({"attention": "tp"}, r"mp=3 does not divide n_heads=4"),
    ({"attention": "sp"}, r"mp=3 does not divide n_heads=4"),
    ({"moe": "ep"}, r"mp=3 does not divide n_experts=4"),
    ({"moe": "ag_scatter"}, r"mp=3 does not divide n_experts=4"),
])
def test_mesh_does_not_divide_the_model(tiny, strategies, message):
    cfg, graph = tiny
    plan = uniform_plan(graph, Mesh.of(mp=3), {"attention": "replicate", "moe": "seq", **strategies})
    with pytest.raises(PlanError, match=message):
        ParallelModel(make_model(cfg), plan, graph=graph, groups=_groups_without_communicators(plan.mesh))


def test_kv_heads_and_ranks_must_divide_one_another():
    cfg = tiny_config(n_heads=6, n_kv_heads=3, dim=48)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, Mesh.of(mp=2), {"attention": "tp"})
    with pytest.raises(PlanError, match=r"mp=2 and n_kv_heads=3 must divide one another"):
        ParallelModel(make_model(cfg), plan, graph=graph, groups=_groups_without_communicators(plan.mesh))


@pytest.mark.parametrize("batch,seq,message", [
    (4, 7, r"mp=2 does not divide the sequence length 7"),
    (3, 8, r"dp=2 does not divide the batch size 3"),
])
def test_batch_or_sequence_not_divisible(tiny, batch, seq, message):
    """Every rank raises at the call, before its first collective: none is left waiting on a peer."""
    cfg, graph = tiny
    mesh = Mesh.of(dp=2, mp=2)
    plan = uniform_plan(graph, mesh, {"attention": "sp", "moe": "ep"})
    world = LocalWorld(4, timeout_s=10)
    groups = world.groups(mesh)
    tokens = torch.zeros(batch, seq, dtype=torch.long)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        with pytest.raises(PlanError, match=message):
            pm(tokens)
        return pm.comm_stats.total()

    assert world.run(rank) == [0, 0, 0, 0]


def test_sequence_longer_than_rope_tables(tiny):
    cfg, graph = tiny
    plan = uniform_plan(graph, Mesh.of(mp=1), {})
    pm = ParallelModel(make_model(cfg), plan, graph=graph)
    with pytest.raises(PlanError, match=rf"sequence length 40 exceeds .* max_seq_len {cfg.max_seq_len}"):
        pm(torch.zeros(1, 40, dtype=torch.long))

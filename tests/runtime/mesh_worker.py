"""The spawned side of test_world_device_mesh: one rank of a 4-process gloo world checks the DeviceMesh
MeshGroups.from_world builds and a step of a dp2 x mp2 plan's DTensor parameters on it. A module, not a test file,
so the spawned processes can import it; a failed assertion fails the spawn."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from rt_harness import batch_for, loss_of, make_model, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.runtime import ParallelModel
from meshplan.runtime.process_groups import MeshGroups


class Transposed(Mesh):
    """A mesh whose groups lie about the layout (column-major): what a drift between Mesh.groups and
    init_device_mesh would look like."""

    def groups(self, name):
        return [list(g) for g in zip(*super().groups(name))]


def worker(rank: int, world: int) -> None:
    mesh = Mesh.of(dp=2, mp=2)
    groups = MeshGroups.from_world(mesh, timeout_s=45)
    dm = groups.world_mesh
    assert dm.mesh_dim_names == ("dp", "mp") and dm.mesh.tolist() == [[0, 1], [2, 3]]
    for name in mesh.names:  # one set of groups: the axis groups are the DeviceMesh's
        g = groups.axes[name]
        assert g.pg is dm.get_group(name) and list(g.ranks) == dist.get_process_group_ranks(g.pg), name
        # the collective timeout reaches the mesh's groups (init_device_mesh's own default is 30 minutes)
        assert g.pg._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=45), name

    cfg = tiny_config(n_shared_experts=1)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, mesh, {"attention": "tp", "moe": "ep", "embedding": "vocab"})
    pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups)
    assert all(p.device_mesh == dm for _, p in pm.named_parameters())
    tokens, targets = batch_for(cfg, 4, 8)
    loss_of(pm(tokens), targets).backward()
    pm.reduce_gradients()
    grads = pm.full_grads()
    ref = make_model(cfg)
    loss_of(ref(tokens), targets).backward()
    for name, p in ref.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-6), name

    try:
        MeshGroups.from_world(Transposed(mesh.axes), timeout_s=60)
    except RuntimeError as e:
        assert str(e).startswith("plan.mesh (dp=2, mp=2): init_device_mesh put rank") and "but Mesh.groups(" in str(e)
    else:
        raise AssertionError("a mesh laid out otherwise than init_device_mesh was accepted")

"""ParallelModel's DeviceMesh and DTensor view: named after the plan's axes, over the same groups, and each
parameter's shard is the DTensor shard of the plan's placements (full_tensor() gives the model's weight back)."""
import torch
from rt_harness import make_model, tiny_config, uniform_plan
from torch.distributed.tensor import DTensor, Shard

from meshplan.ir import Mesh, trace
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.device_mesh import device_mesh, dtensor_placements


def test_parameters_as_dtensors_on_a_2x2_mesh():
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    mesh = Mesh.of(dp=2, mp=2)
    plan = uniform_plan(graph, mesh, {"attention": "tp", "ffn": "tp", "moe": "ep", "embedding": "vocab"})
    world = LocalWorld(4, timeout_s=60)
    groups = world.groups(mesh)
    model = make_model(cfg)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        dm = pm._device_mesh
        assert dm.mesh_dim_names == ("dp", "mp") and list(dm.get_coordinate()) == [g.index for g in groups[r].ordered()]
        sharded = 0
        for name, p in model.named_parameters():
            d = pm.dtensor(name)
            assert isinstance(d, DTensor) and d.placements == dtensor_placements(groups[r], pm.placement_of(name),
                                                                                  p.dim())
            assert torch.equal(d.to_local(), pm._params[name].to_local()), name
            assert torch.equal(d.full_tensor(), p.detach()), name
            sharded += any(isinstance(q, Shard) for q in d.placements)
        return sharded

    assert min(world.run(rank)) > 0  # some parameters are sharded


def test_size_one_axes_are_left_out():
    world = LocalWorld(2, timeout_s=60)
    groups = world.groups(Mesh.of(pp=1, mp=2, ep=1))

    def rank(r):
        dm = device_mesh(groups[r])
        return dm.mesh_dim_names, list(dm.get_coordinate()), dm.size()

    assert world.run(rank) == [(("mp",), [0], 2), (("mp",), [1], 2)]

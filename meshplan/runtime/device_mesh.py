"""torch's DeviceMesh over a plan's process groups, and this rank's shards as DTensors.

`device_mesh(groups)` names its dimensions after the plan's mesh axes and uses the axis groups MeshGroups holds (no
new groups), so it works in both kinds of world: in a process world (torchrun, `meshplan run`) it is a slice of the
`init_device_mesh` MeshGroups.from_world built and took its groups from; in an in-process world (LocalWorld, no
default group for init_device_mesh) it is built over the registered gloo groups. Axes of size 1 are left out:
they hold every tensor whole, and leaving them out spares a group per rank; `dtensor_placements` drops their
placements to match. The layout is DTensor's: a dim
sharded on several axes is split by the outer axis first, as ParallelModel cuts its shards
(tests/runtime/test_device_mesh.py checks it for every shard layout of a 2 x 2 mesh).
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as TPartial
from torch.distributed.tensor import Replicate as TReplicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from ..ir.placement import Placement
from .process_groups import MeshGroups
from .torch_placements import placements_to_torch


def device_mesh(groups: MeshGroups) -> DeviceMesh | None:
    """This rank's DeviceMesh over the mesh's axes of size > 1 (None when every axis has size 1)."""
    axes = [g for g in groups.ordered() if g.size > 1]
    if not axes:
        return None
    if groups.world_mesh is not None:  # a process world's init_device_mesh: its sub-mesh of these axes
        names = tuple(g.name for g in axes)
        return groups.world_mesh[names if len(names) > 1 else names[0]]
    grid = torch.arange(groups.mesh.size).view(*(g.size for g in groups.ordered()))
    for i in reversed(range(grid.dim())):
        if grid.shape[i] == 1:
            grid = grid.squeeze(i)
    # DeviceMesh.from_group, less its look-up of the group's ranks in the default group's tables (an in-process
    # world has no default group): the mesh, this rank, and the registered group of each dimension
    # ranks relative to the mesh (a pipeline stage's mesh does not start at global rank 0): only this rank's
    # coordinate is read from them, and the groups are given by name
    here = 0
    for g in groups.ordered():
        here = here * g.size + g.index
    dm = DeviceMesh(groups.device.type, grid, mesh_dim_names=tuple(g.name for g in axes), _init_backend=False,
                    _rank=here)
    dm._dim_group_names = [g.group_name for g in axes]
    for g in axes:
        dm._pg_registry[g.group_name] = g.pg
    return dm


def dtensor_placements(groups: MeshGroups, placements: tuple[Placement, ...], ndim: int):
    """A plan placement (one per mesh axis) as DTensor placements on device_mesh(groups)'s dimensions."""
    kept = [p for g, p in zip(groups.ordered(), placements) if g.size > 1]
    return placements_to_torch(kept, ndim)


def as_dtensor(local: torch.Tensor, dm: DeviceMesh, groups: MeshGroups, placements: tuple[Placement, ...],
               shape: tuple[int, ...]) -> DTensor:
    """This rank's shard `local` of a tensor of `shape` laid out as `placements`, as a DTensor (no copy)."""
    full = torch.empty(shape, device="meta")
    return DTensor.from_local(local, dm, dtensor_placements(groups, placements, len(shape)), run_check=False,
                              shape=full.shape, stride=full.stride())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of `t`: a DTensor's local shard, the very object (not a view: ZeRO re-points
    its storage, zero.py), or `t` itself (a one-rank world's plain tensors)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def laid_out_as(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local`, this rank's shard of a tensor laid out as `param` (its gradient, an optimizer state), as a
    DTensor with param's mesh, placements and global shape; `local` itself when param is a plain tensor. A copy
    of param's DTensorSpec, not DTensor.from_local's new one (10x cheaper, once per parameter and step)."""
    if not isinstance(param, DTensor):
        return local
    return DTensor(local.contiguous(), copy.copy(param._spec), requires_grad=False)


def grad_spec(param: DTensor, placements) -> DTensorSpec:
    """The DTensorSpec of the gradient an op produces for `param` (placements: grad_placements'), built once."""
    return DTensorSpec(param.device_mesh, tuple(placements),
                       tensor_meta=TensorMeta(param.shape, param.stride(), param.dtype))


class _LocalShard(torch.autograd.Function):
    """DTensor.to_local(grad_placements=...) with the gradient's DTensorSpec made once per parameter: torch's
    backward (_ToTorchTensor) derives two new specs on every call, which made a parameter's to_local + backward
    cost ~250 us against ~60 us for a plain tensor (tests/runtime step times +20%); with the spec given, ~100 us."""

    @staticmethod
    def forward(ctx, param: DTensor, spec: DTensorSpec) -> torch.Tensor:
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        local = param._local_tensor
        return local.view_as(local)  # a fresh tensor object: autograd writes its metadata into it

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None
        # contiguous: the layout AccumulateGrad gives a plain parameter's gradient (and the spec's stride)
        return DTensor(grad.contiguous(), copy.copy(ctx.spec), requires_grad=False), None


def local_view(param: DTensor, spec: DTensorSpec) -> torch.Tensor:
    """This rank's shard of `param` for an op to compute with: differentiable, its gradient arriving on `param`
    as a DTensor laid out as `spec` (grad_spec)."""
    return _LocalShard.apply(param, spec)


def grad_placements(groups: MeshGroups, placements: tuple[Placement, ...], ndim: int):
    """The layout of the gradient an op produces for a parameter laid out as `placements`: Shard where it is
    sharded, Partial(sum) on every axis it is replicated on (the ranks that share it saw different tokens, or
    computed redundantly from a Partial output gradient, sharding.py), until reduce_gradients sums them."""
    return tuple(TPartial() if isinstance(p, TReplicate) else p
                 for p in dtensor_placements(groups, placements, ndim))

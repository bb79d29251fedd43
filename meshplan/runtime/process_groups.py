"""Process groups for a plan's mesh: one group per axis slice (the ranks `Mesh.groups(axis)` lists).

Two ways to build them. `MeshGroups.from_world` runs after `torch.distributed.init_process_group` (torchrun or
`meshplan run`) and builds torch's DeviceMesh, `init_device_mesh` with the plan's axes as its named dimensions (as
torchtitan's ParallelDims does), each dimension's groups with an explicit timeout so that a dead rank turns into
an error instead of a hang; it checks that the mesh lays ranks out as `Mesh.groups` does (one clear error
otherwise) and takes the axis groups from it (`dm.get_group(axis)`): one set of groups, used by the collectives,
the DTensor parameters and the checkpoints alike. `MeshGroups.in_process` builds the same groups for one rank of a
world whose ranks are threads of a single process (gloo groups over a shared HashStore): the fast path tests use to
run many plans.
Collectives are torch's functional collectives (`torch.distributed._functional_collectives`, collectives.py),
which find a group by its registered name (`AxisGroup.group_name`): `dist.new_group` registers its groups; an
in-process group is a `ProcessGroup` with a gloo backend, registered under a name unique to its rank and
unregistered when its AxisGroup is garbage-collected (the registry holds a strong reference to the group).
"""
from __future__ import annotations

import datetime
import itertools
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..ir.mesh import Mesh
from ..ir.plan import PlanError

DEFAULT_TIMEOUT_S = 600.0
_SERIAL = itertools.count()  # in-process group names


@dataclass(frozen=True)
class AxisGroup:
    """This rank's slice of one mesh axis."""

    name: str
    size: int
    index: int  # this rank's coordinate on the axis
    ranks: tuple[int, ...]  # global ranks of the slice, in coordinate order
    pg: object | None  # torch ProcessGroup; None when size == 1 (nothing to communicate)
    group_name: str = ""  # the name funcol resolves pg by (registered with c10d); "" when pg is None

    @property
    def trivial(self) -> bool:
        return self.size == 1


@dataclass
class MeshGroups:
    mesh: Mesh
    rank: int  # global rank
    axes: dict[str, AxisGroup]
    device: torch.device
    backend: str
    # torch's init_device_mesh over the world's whole mesh (a pipeline's pp axis included) in a process world;
    # None in an in-process or one-rank world (device_mesh.py builds one over the axis groups there)
    world_mesh: DeviceMesh | None = None

    def axis(self, name: str) -> AxisGroup:
        return self.axes[name]

    def ordered(self) -> list[AxisGroup]:
        """The axis groups in mesh order, outermost first."""
        return [self.axes[n] for n in self.mesh.names]

    @property
    def is_root(self) -> bool:
        """Coordinate 0 on every axis (global rank 0 of the mesh)."""
        return all(g.index == 0 for g in self.axes.values())

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_world(cls, mesh: Mesh, timeout_s: float | None = None,
                   device: str | torch.device | None = None) -> "MeshGroups":
        """Groups over the default process group's ranks. Checks the world size first: no collective runs for
        a mesh that does not fit the world. device: where the ranks' tensors live (default: this rank's GPU
        under NCCL, the CPU under gloo); "cuda" with gloo runs several ranks on one GPU (gloo stages CUDA
        tensors through the host: for checking the CUDA code paths, not for speed)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call meshplan.runtime.init_distributed() "
                               "(or dist.init_process_group) before building a ParallelModel")
        world, rank = dist.get_world_size(), dist.get_rank()
        check_world_size(mesh, world)
        backend = dist.get_backend()
        device = torch.device(device) if device else _device_for(backend)
        dm = world_device_mesh(mesh, device.type, backend, datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))
        axes = {}
        for name, size in mesh.axes:
            ranks = next(r for r in mesh.groups(name) if rank in r)
            pg = dm.get_group(name) if size > 1 else None
            axes[name] = AxisGroup(name, size, ranks.index(rank), tuple(ranks), pg, pg.group_name if pg else "")
        return cls(mesh, rank, axes, device, backend, dm)

    @classmethod
    def in_process(cls, mesh: Mesh, rank: int, store: dist.Store, timeout_s: float = 60.0,
                   prefix: str = "meshplan") -> "MeshGroups":
        """Gloo groups for one rank of an in-process world (ranks are threads sharing `store`). Only the members
        of a slice take part in building its group, so each rank builds just its own slices. CPU tensors only:
        autograd runs every thread's CUDA backward on one worker thread per device, so two ranks' blocking
        collectives in a backward on one GPU wait on each other (a 2-thread world on an H200 hung in its first
        backward reduce-scatter); use processes there (from_world with device="cuda")."""
        timeout = datetime.timedelta(seconds=timeout_s)
        axes = {}
        for name, size in mesh.axes:
            for gi, ranks in enumerate(mesh.groups(name)):
                if rank not in ranks:
                    continue
                if size == 1:
                    axes[name] = AxisGroup(name, size, 0, tuple(ranks), None)
                    continue
                key = f"{prefix}/{name}/{gi}"
                pg = _gloo_group(dist.PrefixStore(key, store), ranks.index(rank), size, timeout)
                gname = f"{key}/rank{rank}/{next(_SERIAL)}"  # one registry per process: a name per rank, never reused
                _register(gname, pg)
                axes[name] = AxisGroup(name, size, ranks.index(rank), tuple(ranks), pg, gname)
                weakref.finalize(axes[name], _unregister, gname)
        return cls(mesh, rank, axes, torch.device("cpu"), "gloo")

    @classmethod
    def single(cls, mesh: Mesh, device: str | torch.device = "cpu") -> "MeshGroups":
        """A one-rank world (every axis of size 1): no process group needed."""
        check_world_size(mesh, 1)
        axes = {n: AxisGroup(n, 1, 0, (0,), None) for n in mesh.names}
        return cls(mesh, 0, axes, torch.device(device), "none")


def world_device_mesh(mesh: Mesh, device_type: str, backend: str, timeout: datetime.timedelta) -> DeviceMesh:
    """init_device_mesh over `mesh` (a collective of the default group's ranks), its dimensions named after the
    axes, each group with `timeout`; refused in one line unless every axis's groups hold the ranks Mesh.groups
    lists (the row-major layout both use; a change in either would silently mis-route every collective)."""
    opts = _timeout_options(backend, timeout)
    override = {name: (backend, opts) for name in mesh.names} if opts is not None else None
    dm = init_device_mesh(device_type, mesh.shape, mesh_dim_names=mesh.names, backend_override=override)
    rank = dist.get_rank()
    for name, size in mesh.axes:
        want = next(r for r in mesh.groups(name) if rank in r)
        got = dist.get_process_group_ranks(dm.get_group(name)) if size > 1 else [rank]
        if list(got) != list(want):
            raise RuntimeError(f"plan.mesh {mesh}: init_device_mesh put rank {rank} on axis {name!r} with ranks "
                               f"{list(got)}, but Mesh.groups({name!r}) lists {list(want)}")
    return dm


def _timeout_options(backend: str, timeout: datetime.timedelta):
    """Backend options carrying `timeout` (init_device_mesh takes no timeout of its own); None for a backend
    string it cannot be given to (a per-device "cpu:gloo,cuda:nccl"), whose groups get torch's default."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
    else:
        return None
    opts._timeout = timeout
    return opts


def _gloo_group(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A ProcessGroup over one gloo backend, as dist.new_group builds it (funcol needs a ProcessGroup, not the bare
    backend)."""
    pg = dist.ProcessGroup(store, rank, size)
    gloo = dist.ProcessGroup.BackendType.GLOO
    pg._register_backend(torch.device("cpu"), gloo, dist.ProcessGroupGloo(store, rank, size, timeout))
    pg._set_default_backend(gloo)
    return pg


def _register(name: str, pg: dist.ProcessGroup) -> None:
    pg._set_group_name(name)
    _c10d._register_process_group(name, pg)


def _unregister(name: str) -> None:
    _c10d._unregister_process_group(name)


def check_world_size(mesh: Mesh, world: int) -> None:
    if mesh.size != world:
        raise PlanError(f"plan.mesh {mesh} needs {mesh.size} ranks, but the world has {world} "
                        f"(launch with --nproc {mesh.size}, or write a mesh whose axis sizes multiply to {world})")


def _device_for(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend(local_rank: int | None = None, local_world: int | None = None) -> str:
    """The backend for this rank, chosen by the device it will use: NCCL when it has a GPU of its own (local rank
    < the visible CUDA devices), gloo on CPU otherwise. Every rank of a world must pick the same backend, so NCCL
    is chosen only when every local rank has its GPU (LOCAL_WORLD_SIZE <= device count, as torchrun and
    local_spawn set it): 8 local ranks on a 4-GPU machine run gloo on all 8, not NCCL on 4 and gloo on 4."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world is None else local_world
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if max(local_rank, local_world - 1) < gpus else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (env:// rendezvous). Returns (rank, world).
    backend: "nccl", "gloo", or None for default_backend(); NCCL binds this rank to GPU LOCAL_RANK and is refused
    in one line when this rank has no GPU of its own."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or default_backend()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= gpus:
            raise RuntimeError(f"backend nccl: local rank {local_rank} has no GPU of its own ({gpus} CUDA devices "
                               f"visible; NCCL needs one GPU per rank); use --backend gloo")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()

"""Distributed checkpoints of a ParallelModel and its AdamW state with torch.distributed.checkpoint (DCP).

    save(pm, opt, "ckpt", step=10)      # every rank writes its own shards: ckpt/step_000010/ (atomic)
                                        # (opt: torch's AdamW over pm's shards, or zero.ZeroAdamW)
    step = load(pm, opt, latest("ckpt"))  # any plan, any world size: DCP reshards on load
    export("ckpt/step_000010", "full.pt")  # one torch.save file of full tensors (as dcp_to_torch_save)

Each shard is handed to DCP as a DTensor: pm's parameters and torch AdamW's states of them are DTensors already;
ZeroAdamW's per-parameter states (local shards) are laid out as their parameters; a one-rank world's plain tensors
are wrapped on the world's init_device_mesh (MeshGroups.world_mesh). The checkpoint's metadata records every shard's
global offset and the loader reads the slices the loading plan needs, whatever the saving plan was. Replicated
shards are written once.
A save goes into a hidden temporary directory that rank 0 renames to step_NNNNNN/ after every rank has finished
writing and DCP has written its .metadata: a step directory is complete or absent (docs/reference.md,
"Distributed checkpoints").

DCP needs torch.distributed's default process group (its planner gathers every rank's plan over it, and
init_device_mesh builds its groups from it): the in-process thread worlds (LocalWorld) have none, so checkpoints
are taken in real processes (torchrun, `meshplan run`, local_spawn.spawn). A pipeline stage's ParallelModel saves
its own parameters, as DTensors on its stage's sub-mesh; the checkpoint holds every stage's, keyed by their names
in the whole model, so it loads under any plan, pipelined or not.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as TReplicate
from torch.distributed.tensor import Shard as TShard

from ..ir.placement import Replicate, Shard
from ..ir.plan import PlanError
from .checkpoint_reader import SafeReader, read_metadata
from .device_mesh import local_tensor
from .executor import ParallelModel
from .zero import ZeroAdamW, init_adam_state

_STEP = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp_step_"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under `root` (temporary directories are never returned)."""
    root = Path(root)
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()] \
        if root.is_dir() else []
    return max(steps)[1] if steps else None


def device_mesh(pm: ParallelModel) -> DeviceMesh:
    """torch's DeviceMesh of pm's plan mesh, every axis (the process world's init_device_mesh, process_groups.py).
    A pipeline stage's: the sub-mesh of its pp coordinate in the pp x dp x mp mesh."""
    dm = pm.groups.world_mesh
    if dm is None or not dist.is_initialized():
        raise RuntimeError("checkpoint: DCP needs torch.distributed's default process group and its DeviceMesh "
                           "(run under torchrun, `meshplan run` or local_spawn.spawn; in-process LocalWorld ranks "
                           "have none)")
    names = pm.plan.mesh.names
    return dm[names if len(names) > 1 else names[0]] if pm.plan.pipeline.enabled else dm


def _torch_placements(name: str, placement) -> list:
    out = []
    for p in placement:
        if isinstance(p, Shard):
            out.append(TShard(p.dim))
        elif isinstance(p, Replicate):
            out.append(TReplicate())
        else:
            raise PlanError(f"checkpoint: parameter {name} is laid out as {p}; only Shard and Replicate "
                            f"parameters can be saved")
    return out


def _dtensor(pm: ParallelModel, name: str, local: torch.Tensor) -> DTensor:
    """`local` (a DTensor, or this rank's shard of one laid out as parameter `name`) as a DTensor."""
    if isinstance(local, DTensor):
        return local
    if pm.device_mesh is not None:
        return pm.dtensor(name, local)
    mesh = device_mesh(pm)  # a one-rank world: plain tensors
    placements = _torch_placements(name, pm.placement_of(name))
    shape = list(local.shape)
    for (axis, size), p in zip(pm.plan.mesh.axes, placements):
        if isinstance(p, TShard):
            shape[p.dim] *= size
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def state_dict(pm: ParallelModel, opt: torch.optim.Optimizer | ZeroAdamW | None = None, step: int = 0) -> dict:
    """What save() writes and load() fills in place: the parameters and optimizer states as DTensors (pm's
    parameters and the optimizer's state tensors, or views of them, no copies; under ZeroAdamW, its state gathered
    to the local shards' shapes), the optimizer's step counts, and the training step."""
    sd: dict = {"step": torch.tensor(step, dtype=torch.int64)}
    params = dict(pm.named_parameters())
    sd["model"] = {n: _dtensor(pm, n, p.detach()) for n, p in params.items()}
    if opt is not None:
        optim = {}
        for n, state in param_states(pm, opt).items():
            for key, value in state.items():
                same = isinstance(value, DTensor) or (torch.is_tensor(value) and value.dim() > 0 and
                                                      value.shape == local_tensor(params[n]).shape)
                optim[f"{n}.{key}"] = _dtensor(pm, n, value) if same else value
        sd["optim"] = optim
    return sd


def param_states(pm: ParallelModel, opt: torch.optim.Optimizer | ZeroAdamW) -> dict[str, dict]:
    """{parameter name: its optimizer state, shaped like pm's local shard} (empty AdamW state before the first
    step, so that a load has tensors to fill). A collective under ZeroAdamW."""
    if isinstance(opt, ZeroAdamW):
        return opt.param_states()
    names = {id(p): n for n, p in pm.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("checkpoint: the optimizer holds a parameter that is not one of pm's shards")
            out[names[id(p)]] = init_adam_state(opt, p)
    return out


def save(pm: ParallelModel, opt: torch.optim.Optimizer | None, root: str | Path, step: int) -> Path:
    """Write pm's shards (and opt's state) as root/step_NNNNNN/ (a collective: call on every rank). The step
    directory appears only once complete; an existing one is an error (a checkpoint is never overwritten)."""
    root = Path(root)
    final, tmp = step_dir(root, step), root / f"{_TMP_PREFIX}{step:06d}"
    sd = state_dict(pm, opt, step)
    rank = dist.get_rank()
    if final.exists():  # checked on every rank (DCP's FileSystemWriter needs a shared file system anyway)
        raise FileExistsError(f"checkpoint: {final} already exists")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before its rename
    dist.barrier()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))  # returns once .metadata is written
    dist.barrier()
    if rank == 0:
        os.rename(tmp, final)
        fsync_dir(root)
    dist.barrier()
    return final


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry is written by fsync of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(pm: ParallelModel, opt: torch.optim.Optimizer | None, path: str | Path) -> int:
    """Fill pm's shards (and opt's state) from the checkpoint at `path`, saved under any plan and world size
    (a collective). Returns the step it was saved at. A parameter missing from the checkpoint, or of another
    shape, is an error naming it."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint: {path} is not a complete DCP checkpoint (no .metadata)")
    _check_shapes(pm, path)
    sd = state_dict(pm, opt)
    dcp.load(sd, storage_reader=SafeReader(path))
    # The DTensors are views of the parameters and optimizer tensors, so those are filled; the scalars are not.
    if opt is not None:
        states: dict[str, dict] = {}
        for key, value in sd["optim"].items():
            name, _, field = key.rpartition(".")
            states.setdefault(name, {})[field] = value.to_local() if isinstance(value, DTensor) else value
        if isinstance(opt, ZeroAdamW):  # DCP filled the gathered copies: keep this rank's slice
            opt.load_param_states(states)
        else:
            names = dict(pm.named_parameters())
            for key, value in sd["optim"].items():
                if not isinstance(value, DTensor):
                    name, _, field = key.rpartition(".")
                    opt.state[names[name]][field] = value
    return int(sd["step"])


def _check_shapes(pm: ParallelModel, path: Path) -> None:
    meta = read_metadata(path).state_dict_metadata
    for name, p in pm.named_parameters():
        entry = meta.get(f"model.{name}")
        if entry is None:
            raise KeyError(f"checkpoint {path}: no parameter {name!r}")
        full = list(pm.full_shape(name))
        if list(entry.size) != full:
            raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {tuple(entry.size)}, the model's is "
                             f"{tuple(full)}")


def export(path: str | Path, out: str | Path) -> Path:
    """One torch.save file of full tensors from a DCP checkpoint (no process group needed). Read it back with
    torch.load(out, weights_only=True). This is format_utils.dcp_to_torch_save's body with SafeReader in place of
    FileSystemReader, whose metadata is unpickled without restriction (checkpoint_reader.py)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # what dcp_to_torch_save calls

    read_metadata(path)  # a bad checkpoint: one ValueError naming the file, not DCP's wrapped per-rank traces
    sd: dict = {}
    _load_state_dict(sd, storage_reader=SafeReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    torch.save(sd, out)
    return Path(out)

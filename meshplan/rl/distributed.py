"""Process groups for RL: start N ranks (or join torchrun's), split prompts, gather rollouts.

Each rank generates the rollouts of its share of the step's prompts; all_gather then gives every rank the same
global batch (rank order), which is what the compiled models' forward takes. The backend follows each rank's
device, as `meshplan run` chooses it: NCCL when every local rank has a GPU of its own, gloo on CPU (never gloo
hard-coded, never NCCL because some GPU exists). Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR set) a rank joins
the env:// rendezvous; otherwise the ranks are started here with runtime.local_spawn (a private file:// store,
loopback sockets, every rank stopped with the launcher).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshplan.runtime.process_groups import default_backend

BACKENDS = ("auto", "gloo", "nccl")


def backend_for(local_world: int, backend: str = "auto") -> str:
    """NCCL when this machine has a GPU for each of its `local_world` ranks, else gloo ("auto": the runtime's
    default_backend, the rule `meshplan run` uses); or as given."""
    if backend != "auto":
        return backend
    return default_backend(local_rank=0, local_world=local_world)


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share (the first ranks take one more when it does not divide)."""
    n = len(items)
    lo = rank * (n // world) + min(rank, n % world)
    return items[lo : lo + n // world + (rank < n % world)]


def all_gather_objects(obj) -> list:
    _, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def launch(fn, nproc: int, *args, timeout_s: float = 600.0, backend: str = "auto") -> None:
    """Run fn(rank, world, *args) on nproc ranks: this process's world when torch.distributed is initialised
    (tests, notebooks) or under torchrun (env://, its world size must be nproc), else nproc local processes
    (this process when nproc == 1)."""
    from ..runtime.local_spawn import spawn

    if dist.is_initialized() or under_torchrun():
        with joined_world(timeout_s, backend) as (rank, world):
            if world != nproc:
                from ..cli_args import RunFailed

                raise RunFailed(f"train.nproc is {nproc}, but the torch.distributed world has {world} ranks")
            fn(rank, world, *args)
        return
    if nproc > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
        try:
            spawn(nproc, fn, *args, backend=backend_for(local, backend), timeout_s=timeout_s, start_method="spawn",
                  threads=1)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            from ..cli_args import RunFailed
            from ..runtime.local_spawn import first_line_of_failure

            raise RunFailed(first_line_of_failure(e)) from None
        return
    with one_rank_world(timeout_s, backend):
        fn(0, 1, *args)


@contextmanager
def joined_world(timeout_s: float = 600.0, backend: str = "auto"):
    """The caller's initialised world (left to the caller), or torchrun's env:// one (destroyed afterwards)."""
    from ..runtime.process_groups import init_distributed

    if dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    rank, world = init_distributed(backend_for(local, backend), timeout_s)
    try:
        yield rank, world
    finally:
        shutdown()


@contextmanager
def one_rank_world(timeout_s: float = 600.0, backend: str = "auto"):
    """A one-rank world in this process (the runtime and DCP need a process group), unless one exists."""
    from ..runtime.local_spawn import init_local, private_store

    if dist.is_initialized():
        yield
        return
    with private_store() as init_method:
        init_local(init_method, 0, 1, backend_for(1, backend), timeout_s)
        try:
            yield
        finally:
            shutdown()


def set_threads(threads: int, nproc: int) -> None:
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // nproc))

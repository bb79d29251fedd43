"""Process groups for data-parallel RL on CPU: spawn N gloo ranks, split prompts, gather rollouts.

Each rank generates the rollouts of its share of the step's prompts; all_gather then gives every rank the same
global batch (rank order), which is what ParallelModel's forward takes.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    """Join (or, for world 1, create) the gloo group. World 1 still gets a group: the runtime expects one."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


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


def launch(fn, nproc: int, *args, timeout_s: float = 600.0) -> None:
    """Run fn(rank, world, *args) in nproc gloo processes (in this process when nproc == 1), through the
    runtime's local_spawn: a private file:// store, loopback sockets, every rank stopped with the launcher."""
    from ..runtime.local_spawn import init_local, private_store, spawn

    if nproc > 1:
        try:
            spawn(nproc, fn, *args, backend="gloo", timeout_s=timeout_s, start_method="spawn", threads=1)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            from ..cli_args import RunFailed
            from ..runtime.local_spawn import first_line_of_failure

            raise RunFailed(first_line_of_failure(e)) from None
        return
    if dist.is_initialized():  # the caller's one-rank group (tests, notebooks): use it, leave it to them
        fn(0, 1, *args)
        return
    with private_store() as init_method:
        init_local(init_method, 0, 1, "gloo", timeout_s)
        try:
            fn(0, 1, *args)
        finally:
            shutdown()


def set_threads(threads: int, nproc: int) -> None:
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // nproc))

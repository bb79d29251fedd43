"""Rank functions for the lifecycle tests (a module, so that forkserver and spawn children can import them)."""
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from procfs import listening


def record_listeners(rank: int, world: int, out: str) -> None:
    """Each rank writes its pid and the addresses it listens on, after a collective has connected the world."""
    t = torch.ones(1)
    dist.all_reduce(t)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "listening": listening(os.getpid())}))
    dist.barrier()


def listen_then_stop(rank: int, world: int, out: str) -> None:
    """record_listeners, then rank 1 stops itself (SIGSTOP) while rank 0 waits for it in a collective."""
    record_listeners(rank, world, out)
    if rank == 1:
        Path(out, "stopped_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP)
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 hangs here until the collective timeout


def report_then_wait(rank: int, world: int, out: str) -> None:
    """Write this rank's pid once the world is connected, then wait (until the launcher stops us)."""
    dist.barrier()
    Path(out, f"rank{rank}.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(1)

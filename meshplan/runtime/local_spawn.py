"""Start N local rank processes and own their lifetime: no orphans, no open ports, a bounded end.

    spawn(4, fn, *args, timeout_s=60)      # fn(rank, world, *args) in 4 processes, torch.distributed initialised

- Rendezvous through a FileStore in a private directory (mkdtemp: 0700), not a TCPStore: a TCPStore's server
  listens on every interface, a file listens on none. Gloo's own pair sockets are bound to the loopback
  interface (GLOO_SOCKET_IFNAME=lo unless the user chose one), so nothing a local run opens is reachable from
  another machine.
- SIGTERM, SIGINT and SIGHUP to the launcher stop every rank (SIGTERM, then SIGKILL after GRACE_S), and each rank
  watches the launcher (a pidfd, and the parent-death signal) and kills itself when it is gone, so even a
  SIGKILLed launcher leaves no rank running.
- When one rank fails, the others get 2 x FAIL_GRACE_S to exit before they are killed (torch's default is 30 s),
  so a stopped or hung rank ends the run within the collective timeout plus a few seconds.
Platform facts relied on: docs/reference.md, "Local launches and input files".
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GRACE_S = 2.0  # a signalled launcher: how long ranks get to exit after SIGTERM before SIGKILL
FAIL_GRACE_S = 0.5  # a rank failed: the others get this long, twice (exit, then SIGTERM), before SIGKILL
_PR_SET_PDEATHSIG = 1
SPAWNED = 0  # processes this launcher has started (diagnostics; tests check that rejected input starts none)


class Stopped(BaseException):
    """The launcher got a termination signal; its ranks have been stopped."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}; every rank was terminated")
        self.signum = signum


def die_with_launcher(launcher_pid: int) -> None:
    """End this rank when the launcher ends, however it ends (SIGKILL included). A forkserver child's parent is
    the forkserver, which outlives the launcher while any rank lives, so the parent-death signal (prctl
    PR_SET_PDEATHSIG, kept for spawned children) is not enough: a daemon thread waits on a pidfd of the
    launcher (readable once it exits; polling where pidfds are missing) and then SIGKILLs this process."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    try:
        fd = os.pidfd_open(launcher_pid)
    except ProcessLookupError:
        os._exit(1)  # the launcher is already gone
    except (AttributeError, OSError):
        fd = None
    threading.Thread(target=_watch_launcher, args=(launcher_pid, fd), daemon=True, name="meshplan-watch").start()


def _watch_launcher(pid: int, fd: int | None) -> None:
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
    os.kill(os.getpid(), signal.SIGKILL)


def bind_loopback() -> None:
    """Gloo listens on the interface GLOO_SOCKET_IFNAME names (else the host name's address): the loopback one."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    for name in ("lo", "lo0"):
        if os.path.exists(f"/sys/class/net/{name}") or (name == "lo0" and sys.platform == "darwin"):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def init_local(init_method: str, rank: int, world: int, backend: str | None, timeout_s: float) -> None:
    """init_process_group for one rank of a local world, rendezvous at `init_method` (file://...)."""
    from .process_groups import default_backend

    backend = backend or default_backend()
    bind_loopback()
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _entry(rank: int, world: int, init_method: str, launcher_pid: int, fn: Callable, args: tuple,
           backend: str | None, timeout_s: float, threads: int | None) -> None:
    die_with_launcher(launcher_pid)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    init_local(init_method, rank, world, backend, timeout_s)
    fn(rank, world, *args)
    # only on success: after a failed collective, tearing the group down can block on the peers that failed it,
    # and the launcher should hear of the failure (and stop everyone) now
    dist.destroy_process_group()


@contextmanager
def private_store():
    """A file:// init method in a fresh 0700 directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="meshplan-store-")
    try:
        yield f"file://{os.path.join(directory, 'store')}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def signals_raise_stopped():
    """In the main thread: SIGTERM/SIGINT/SIGHUP raise Stopped (so the caller's cleanup runs) instead of killing
    or interrupting the launcher mid-wait."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_all(processes) -> None:
    """SIGTERM every live process, SIGKILL what is left after GRACE_S, reap all."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(GRACE_S / max(len(alive), 1))
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()


def spawn(nproc: int, fn: Callable[..., Any], *args: Any, backend: str | None = None, timeout_s: float = 300.0,
          start_method: str = "forkserver", threads: int | None = None) -> None:
    """Run fn(rank, world, *args) in nproc fresh processes with torch.distributed initialised (collective
    timeout `timeout_s`). If any process fails, the others are stopped and the error is raised here; a
    termination signal to this process stops them all and raises Stopped."""
    global SPAWNED
    if start_method == "forkserver":
        import multiprocessing

        multiprocessing.set_forkserver_preload(["torch", "meshplan.runtime"])
    with private_store() as init_method, signals_raise_stopped():
        ctx = None
        try:
            ctx = mp.start_processes(_entry, args=(nproc, init_method, os.getpid(), fn, args, backend, timeout_s,
                                                   threads), nprocs=nproc, join=False, start_method=start_method)
            SPAWNED += nproc
            with _quiet(logging.getLogger("torch.multiprocessing.spawn")):  # its "Terminating ..." warnings
                while not ctx.join(timeout=0.5, grace_period=FAIL_GRACE_S):
                    pass
        finally:
            if ctx is not None:
                stop_all(ctx.processes)


@contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def first_line_of_failure(e: BaseException) -> str:
    """A failed rank's exception as one line: 'rank 1: RuntimeError: ...' (torch puts the whole traceback in
    the message)."""
    index = getattr(e, "error_index", None)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    return f"rank {index}: {last}" if index is not None else last

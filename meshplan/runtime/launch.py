"""`meshplan run`: train a model under a plan for a few steps on synthetic data, one process per rank.

Two launches, one code path:
  torchrun --nproc_per_node 4 -m meshplan.runtime.launch --model tiny --plan plan.yaml --steps 10
  meshplan run --nproc 4 --model tiny --plan plan.yaml --steps 10      (spawns the 4 processes itself)
Under torchrun (RANK/WORLD_SIZE in the environment) each process joins the env:// rendezvous; otherwise
`cli_run` picks a free local port and starts --nproc processes with torch.multiprocessing. gloo on CPU, NCCL
when every process has a GPU. Rank 0 prints the loss, tokens/s and bytes sent per rank at every step.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ..ir.plan import Plan, PlanError
from ..models import ConfigError, build_model, load_config
from . import run_plan
from .executor import ParallelModel
from .verify import verify, verify_tokens
from .process_groups import init_distributed


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="meshplan run", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=None, help="processes to start (default: the plan's mesh size)")
    p.add_argument("--model", required=True, help="model config: a name in configs/models/ or a YAML path")
    p.add_argument("--plan", required=True, help="plan YAML (meshplan plan ... -o plan.yaml)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=64, help="sequence length")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", choices=("lm", "value"), default="lm")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds")
    p.add_argument("--comm", action="store_true", help="print rank 0's per-collective byte table after the last step")
    p.add_argument("--verify", action="store_true", help="before training, run one step against the single-device "
                   "model and stop with the first differing op if the plan does not compute what it computes")
    p.add_argument("--metrics", default=None, help="also write rank 0's per-step metrics to this file (JSON lines)")
    run_plan.add_arguments(p)
    return p


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def cli_run(argv: list[str] | argparse.Namespace | None = None) -> int:
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    try:
        plan = Plan.from_yaml(args.plan)
        load_config(args.model)
    except (PlanError, ConfigError, OSError) as e:
        print(f"meshplan run: {e}", file=sys.stderr)
        return 2
    if _under_torchrun():
        train(args)
        return 0
    nproc = args.nproc or plan.world_size
    if nproc != plan.world_size:  # fail here, not in N processes
        pp = f"pp={plan.pipeline.stages} x " if plan.pipeline.enabled else ""
        print(f"meshplan run: plan.mesh {pp}{plan.mesh} needs {plan.world_size} ranks, but --nproc is {nproc}",
              file=sys.stderr)
        return 2
    try:
        spawn(nproc, _train_entry, args, timeout_s=args.timeout)
    except Exception as e:  # noqa: BLE001 - a failed rank: report and exit non-zero
        print(f"meshplan run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _train_entry(rank: int, world: int, args: argparse.Namespace) -> None:
    train(args)


def train(args: argparse.Namespace) -> list[float]:
    """One rank's training loop (torch.distributed already initialised, or initialised here from env://)."""
    if args.head == "lm":  # any pp x dp x mp plan, per-rank data, loss on local shards, --check
        return run_plan.train(args)
    rank, world = init_distributed(None if args.backend == "auto" else args.backend, args.timeout)
    cfg = load_config(args.model)
    plan = Plan.from_yaml(args.plan)
    model = build_model(cfg, head=args.head, seed=args.seed)
    pm = ParallelModel(model, plan, timeout_s=args.timeout)
    if getattr(args, "verify", False):
        report = verify(pm, model, pm.graph, verify_tokens(pm.graph, torch.zeros(args.batch, args.seq).long()))
        if rank == 0:
            print(f"meshplan run: {report}", flush=True)
    opt = torch.optim.AdamW(pm.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same global batch on every rank
    device = pm.groups.device
    losses = []
    if rank == 0:
        print(f"meshplan run: {cfg.name} on {world} ranks ({pm.groups.backend}), {plan.summary()}", flush=True)
    for step in range(args.steps):
        data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        tokens, targets = data[:, :-1], data[:, 1:].to(device)
        pm.comm_stats.reset()
        start = time.perf_counter()
        out = pm(tokens)
        if args.head == "lm":
            loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
        else:  # a critic regressing to a synthetic target
            loss = F.mse_loss(out.float(), (targets.float() / cfg.vocab_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pm.reduce_gradients()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if rank == 0 and args.metrics:
            with open(args.metrics, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": loss.item(), "seconds": elapsed,
                                    "tokens_per_s": args.batch * args.seq / elapsed,
                                    "comm_bytes_per_rank": pm.comm_stats.total()}) + "\n")
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.6f}  "
                  f"tokens/s {args.batch * args.seq / elapsed:,.0f}  "
                  f"comm {pm.comm_stats.total() / 2**20:.3f} MiB/rank", flush=True)
    if rank == 0 and args.comm:
        print(pm.comm_stats.table(), flush=True)
    dist.barrier()
    return losses


# ---- spawning N local processes ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, backend: str | None,
           timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    init_distributed(backend, timeout_s)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(nproc: int, fn: Callable[..., Any], *args: Any, backend: str | None = None,
          timeout_s: float = 300.0) -> None:
    """Run fn(rank, world, *args) in nproc fresh processes with torch.distributed initialised. If any process
    fails, the others are terminated and the error is raised here.

    Processes fork from a forkserver that imported torch and meshplan once (a single-threaded process, so forking
    it is safe): starting N ranks costs one import instead of N concurrent ones."""
    preload_forkserver()
    mp.start_processes(_entry, args=(nproc, free_port(), fn, args, backend, timeout_s), nprocs=nproc, join=True,
                       start_method="forkserver")


def preload_forkserver(modules: tuple[str, ...] = ("torch", "meshplan.runtime")) -> None:
    import multiprocessing

    multiprocessing.set_forkserver_preload(list(modules))


def main() -> None:
    sys.exit(cli_run(sys.argv[1:]))


def add_parsers(sub) -> None:
    """`meshplan run`, wired into meshplan/cli.py."""
    p = sub.add_parser("run", help="run a plan on N local ranks (gloo on CPU, NCCL on GPU), training on synthetic "
                                   "tokens")
    build_parser(p)
    p.set_defaults(func=cli_run)


if __name__ == "__main__":
    main()

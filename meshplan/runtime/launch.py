"""`meshplan run`: train a model under a plan for a few steps on synthetic data, one process per rank.

Two launches, one code path:
  torchrun --nproc_per_node 4 -m meshplan.runtime.launch --model tiny --plan plan.yaml --steps 10
  meshplan run --nproc 4 --model tiny --plan plan.yaml --steps 10      (spawns the 4 processes itself)
Everything is validated in the launcher first (`check_run`: the plan traced against the model), so a bad input
is one line and no process starts. Under torchrun (RANK/WORLD_SIZE in the environment) each process joins the
env:// rendezvous; otherwise `cli_run` starts the ranks with local_spawn.spawn (a private file:// store, gloo on
loopback, every rank stopped with the launcher). Backend: NCCL when every local rank has a GPU of its own, gloo on
CPU otherwise (process_groups.default_backend), or --backend.
Rank 0 prints the loss, tokens/s and bytes sent per rank at every step.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ..ir.plan import Plan, PlanError
from ..models import build_model, load_config
from . import run_plan
from .executor import ParallelModel
from .local_spawn import first_line_of_failure, spawn
from .process_groups import init_distributed
from .verify import verify, verify_tokens


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from ..cli_args import Parser, int_at_least, nonneg_int, number, positive_int

    p = parser or Parser(prog="meshplan run", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int_at_least(1, 1024), default=None,
                   help="processes to start (default: the plan's mesh size; must equal it)")
    p.add_argument("--model", required=True, help="model config: a NAME (tiny, ...) or a YAML path")
    p.add_argument("--plan", required=True, help="plan YAML (e.g. from `meshplan plan MODEL ... --out plan.yaml`)")
    p.add_argument("--steps", type=positive_int, default=10, help="training steps (default 10)")
    p.add_argument("--batch", type=positive_int, default=8, help="global batch (sequences per step, default 8)")
    p.add_argument("--seq", type=positive_int, default=64,
                   help="sequence length (default 64; at most the model's max_seq_len)")
    p.add_argument("--lr", type=number(0.0, 1.0, lo_open=True), default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=nonneg_int, default=0, help="model initialisation and data seed")
    p.add_argument("--head", choices=("lm", "value"), default="lm", help="LM head or value head (critic)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="collective backend (auto: NCCL when every local rank has a GPU of its own, else gloo on CPU)")
    p.add_argument("--timeout", type=number(0.0, 86400.0, lo_open=True), default=300.0,
                   help="collective timeout in seconds: a hung or stopped rank ends the run after this (+ a few s)")
    p.add_argument("--comm", action="store_true", help="print rank 0's per-collective byte table after the last step")
    p.add_argument("--verify", action="store_true", help="before training, run one step against the single-device "
                   "model and stop with the first differing op if the plan does not compute what it computes")
    p.add_argument("--metrics", default=None, help="also write rank 0's per-step metrics to this file (JSON lines)")
    run_plan.add_arguments(p)
    return p


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def check_run(args: argparse.Namespace) -> Plan:
    """Everything a run can get wrong, checked in the launcher before any process starts: the model config, the
    plan file, the plan against the traced model (op names, strategies, divisibility by the mesh for this batch
    and sequence), plan.model against the model, the sequence against max_seq_len, --nproc against the mesh."""
    from ..cli_args import UsageError
    from ..ir import trace
    from ..ir.plan import check_model

    cfg = load_config(args.model)
    plan = Plan.from_yaml(Path(args.plan))
    nproc = args.nproc or plan.world_size
    if nproc != plan.world_size:
        pp = f"pp={plan.pipeline.stages} x " if plan.pipeline.enabled else ""
        raise PlanError(f"plan.mesh {pp}{plan.mesh} needs {plan.world_size} ranks, but --nproc is {nproc}")
    if args.seq > cfg.max_seq_len:
        raise UsageError(f"--seq: {args.seq} is longer than the model's max_seq_len {cfg.max_seq_len}")
    if getattr(args, "init", "full") == "meta":
        if args.verify:
            raise UsageError("--verify: compares against the whole model on every rank; --init meta builds none")
    else:
        _check_host_memory(cfg, plan.world_size)
    graph = trace(build_model(cfg, head=args.head, device="meta"))
    check_model(plan, graph)
    plan.validate(graph, batch=args.batch, seq=args.seq)
    if args.metrics and not Path(args.metrics).resolve().parent.is_dir():
        raise UsageError(f"--metrics: directory {str(Path(args.metrics).parent)!r} does not exist")
    _check_checkpoint_args(args, plan)
    _check_backend(args, plan)
    return plan


def _check_backend(args: argparse.Namespace, plan: Plan) -> None:
    """--backend nccl without a GPU for every local rank: one line before any process starts (under torchrun
    each rank checks its own LOCAL_RANK in init_distributed)."""
    from ..cli_args import UsageError

    if args.backend != "nccl" or _under_torchrun():
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < plan.world_size:
        raise UsageError(f"--backend nccl: {plan.world_size} ranks need one GPU each, this machine has {gpus}; "
                         f"use --backend gloo (or auto)")


def _check_checkpoint_args(args: argparse.Namespace, plan: Plan) -> None:
    """--checkpoint / --resume: refused here, before any rank starts, when they cannot work."""
    from ..cli_args import UsageError
    from .checkpoint import latest

    ckpt, resume = getattr(args, "checkpoint", None), getattr(args, "resume", False)
    if getattr(args, "checkpoint_every", 0) < 0:
        raise UsageError(f"--checkpoint-every: must be >= 0, got {args.checkpoint_every}")
    if not ckpt:
        if resume:
            raise UsageError("--resume: needs --checkpoint DIR (the directory to resume from)")
        return
    if args.head != "lm":
        raise UsageError(f"--checkpoint: only the lm head's training loop checkpoints (got --head {args.head})")
    found = latest(ckpt)
    if resume and found is None:
        raise UsageError(f"--resume: {ckpt!r} holds no complete checkpoint (step_NNNNNN/)")
    if resume and args.check:
        raise UsageError("--resume: --check trains the one-device reference from step 0; drop one of them")
    if found is not None and not resume:
        raise UsageError(f"--checkpoint: {ckpt!r} already holds {found.name}; pass --resume to continue from it "
                         f"or choose an empty directory")


def _check_host_memory(cfg, ranks: int) -> None:
    """Every local rank builds the whole fp32 model before taking its shards: refuse what this machine's memory
    cannot hold, instead of N processes being killed by the OOM killer."""
    need = cfg.param_count() * 4 * ranks
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise PlanError(f"model {cfg.name}: {ranks} local ranks each build the full fp32 model ({cfg.param_count():,} "
                        f"parameters), {need / 1e9:.1f} GB in all, more than this machine's {have / 1e9:.1f} GB")


def cli_run(argv: list[str] | argparse.Namespace | None = None) -> int:
    """`meshplan run`: validate, then train on --nproc local processes (or this process under torchrun)."""
    from ..cli_args import run_command

    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    return run_command(_run, args)


def _run(args: argparse.Namespace) -> int:
    from ..cli_args import RunFailed

    plan = check_run(args)
    if _under_torchrun():
        train(args)
        return 0
    try:
        spawn(plan.world_size, _train_entry, args, backend=None if args.backend == "auto" else args.backend,
              timeout_s=args.timeout)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise RunFailed(first_line_of_failure(e)) from None
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
    model, init = run_plan.build(cfg, args, args.head)
    pm = ParallelModel(model, plan, timeout_s=args.timeout, init=init, compile=getattr(args, "compile", False))
    if getattr(args, "verify", False):
        report = verify(pm, model, pm.graph, verify_tokens(pm.graph, torch.zeros(args.batch, args.seq).long()))
        if rank == 0:
            print(f"meshplan run: {report}", flush=True)
    opt = run_plan.Optimizer(pm, args)  # ZeRO-1 unless --no-zero, --clip-grad
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
        opt.zero_grad()
        loss.backward()
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


def preload_forkserver(modules: tuple[str, ...] = ("torch", "meshplan.runtime")) -> None:
    import multiprocessing

    multiprocessing.set_forkserver_preload(list(modules))


def main() -> None:
    sys.exit(cli_run(sys.argv[1:]))


def add_parsers(sub) -> None:
    """`meshplan run`, wired into meshplan/cli.py."""
    p = sub.add_parser("run", help="run a plan on N local ranks (gloo on CPU, NCCL on GPU), training on synthetic "
                                   "tokens", description="Validate a plan against the model, then train it on N local "
                                   "processes (one per rank) on synthetic tokens, printing loss and tokens/s.")
    build_parser(p)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    main()

"""`meshplan run`'s training loop for language models: any pp x dp x mp plan, per-rank data, loss on local shards.

Each rank reads only its shard of every global batch (data.py: a token file or the synthetic stream), runs its
pipeline stage (pipeline.py) or the whole model (executor.py) under the plan, and computes the cross-entropy on
its shard of the logits (loss_parallel.py). With --check, rank 0 also trains the single-device model on the same
global batches and stops the run at the first step whose loss differs beyond fp32 tolerance.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ir.plan import Plan, PlanError
from ..ir.tracer import trace
from ..models import build_model, load_config
from .data import ShardedLoader, TokenStream
from .executor import ParallelModel
from .pipeline import PipelineRunner, full_mesh
from .process_groups import MeshGroups, init_distributed
from .verify import verify, verify_tokens

CHECK_RTOL = 1e-4  # fp32 over a few AdamW steps: the ranks sum in a different order than one device


class CheckError(RuntimeError):
    """`meshplan run --check`: a step's loss differs from the single-device run's."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags this loop adds to `meshplan run`."""
    p.add_argument("--data", default=None, help="token ids to train on: a .npy array or a raw binary file "
                   "(--data-dtype); default: the synthetic stream. Each rank reads only its shard")
    p.add_argument("--data-dtype", choices=("uint16", "int32"), default="uint16", help="dtype of a raw --data file")
    p.add_argument("--microbatches", type=int, default=None, help="pipeline micro-batches per step (default: the "
                   "plan's, lowered to a divisor of each data-parallel rank's batch)")
    p.add_argument("--check", action="store_true", help="also train the single-device model on rank 0 and stop "
                   "at the first step whose loss differs (fp32 tolerance)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="save DCP checkpoints (every rank its own "
                   "shards, with the AdamW state) as DIR/step_NNNNNN/ after the last step and every "
                   "--checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="also save every N steps (0: only "
                   "after the last step)")
    p.add_argument("--compile", action="store_true", help="run each op through torch.compile(fullgraph=True) "
                   "(runtime/compile.py; not for pipeline plans)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint DIR "
                   "(saved under any plan and world size) up to --steps in all")


def _microbatches(plan: Plan, local_batch: int, asked: int | None) -> int:
    m = asked or plan.pipeline.microbatches
    if asked and local_batch % asked:
        raise PlanError(f"--microbatches: {asked} does not divide each data-parallel rank's {local_batch} sequences")
    while local_batch % m:
        m -= 1
    return m


class _Reference:
    """The single-device model on the same global batches, for --check."""

    def __init__(self, cfg, args):
        self.model = build_model(cfg, head="lm", seed=args.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        loss = F.cross_entropy(self.model(tokens).flatten(0, 1).float(), targets.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def train(args: argparse.Namespace) -> list[float]:
    """One rank's loop (torch.distributed already initialised, or initialised here from env://)."""
    rank, world = init_distributed(None if args.backend == "auto" else args.backend, args.timeout)
    cfg = load_config(args.model)
    plan = Plan.from_yaml(args.plan)
    model = build_model(cfg, head="lm", seed=args.seed)
    graph = trace(model)
    runner = None
    if plan.pipeline.enabled:
        if getattr(args, "compile", False):
            raise PlanError(f"--compile: pipeline stages run eagerly (plan.mesh.pp={plan.pipeline.stages})")
        if getattr(args, "verify", False):
            raise PlanError(f"--verify: runtime/verify.py checks one ParallelModel, not pipeline stages "
                            f"(plan.mesh.pp={plan.pipeline.stages}); use --check, which compares every step's loss")
        runner = PipelineRunner(model, plan, graph, groups=MeshGroups.from_world(full_mesh(plan), args.timeout))
        pm = runner.model
    else:
        pm = ParallelModel(model, plan, graph, timeout_s=args.timeout, compile=getattr(args, "compile", False))
        if getattr(args, "verify", False):
            report = verify(pm, model, graph, verify_tokens(graph, torch.zeros(args.batch, args.seq).long()))
            if rank == 0:
                print(f"meshplan run: {report}", flush=True)
    stream = TokenStream.from_file(args.data, cfg.vocab_size, args.data_dtype) if args.data else \
        TokenStream.synthetic(cfg.vocab_size, args.seed + 1)
    loader = ShardedLoader(stream, args.batch, args.seq, pm.input_placement(), pm.axes, seed=args.seed)
    m = _microbatches(plan, loader.rows[1] - loader.rows[0], args.microbatches) if runner else 1
    reference = _Reference(cfg, args) if args.check and rank == 0 else None
    opt = torch.optim.AdamW(pm.parameters(), lr=args.lr)
    first = _resume(args, pm, opt, rank)
    if rank == 0:
        lowered = f", the plan's {plan.pipeline.microbatches} does not divide each data-parallel rank's batch" \
            if runner and not args.microbatches and m != plan.pipeline.microbatches else ""
        pipe = f", {plan.pipeline.stages} stages x {m} micro-batches ({plan.pipeline.schedule}{lowered})" \
            if runner else ""
        print(f"meshplan run: {cfg.name} on {world} ranks ({pm.groups.backend}), {plan.summary()}{pipe}; data: "
              f"{stream.name}, each rank reads {tuple(loader.rows)} x {tuple(loader.cols)} of [{args.batch}, "
              f"{args.seq}]", flush=True)
    losses = []
    for step in range(first, args.steps):
        tokens, targets = loader.batch_at(step)
        pm.comm_stats.reset()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if runner is not None:
            loss = runner.step(tokens, targets, local=True, microbatches=m)
        else:
            out = pm.loss(tokens, targets, local=True)
            out.backward()
            loss = out.item()
        pm.reduce_gradients()
        opt.step()
        if pm.groups.device.type == "cuda":
            torch.cuda.synchronize(pm.groups.device)
        elapsed = time.perf_counter() - start
        losses.append(loss)
        _report(args, rank, step, loss, elapsed, pm, reference and reference.step(*loader.global_batch(step)))
        _maybe_save(args, pm, opt, step + 1, rank)
    if rank == 0 and getattr(args, "comm", False):
        print(pm.comm_stats.table(), flush=True)
    dist.barrier()
    return losses


def _resume(args, pm: ParallelModel, opt: torch.optim.Optimizer, rank: int) -> int:
    """--resume: load the latest checkpoint into pm and opt; the step to continue from (0 without --resume)."""
    if not getattr(args, "resume", False):
        return 0
    from . import checkpoint

    path = checkpoint.latest(args.checkpoint)
    step = checkpoint.load(pm, opt, path)
    if rank == 0:
        print(f"meshplan run: resumed from {path} (step {step})", flush=True)
    return step


def _maybe_save(args, pm: ParallelModel, opt: torch.optim.Optimizer, step: int, rank: int) -> None:
    every = getattr(args, "checkpoint_every", 0)
    if not getattr(args, "checkpoint", None) or not (step == args.steps or (every and step % every == 0)):
        return
    from . import checkpoint

    path = checkpoint.save(pm, opt, args.checkpoint, step)
    if rank == 0:
        print(f"meshplan run: saved {path}", flush=True)


def _report(args, rank: int, step: int, loss: float, elapsed: float, pm: ParallelModel, ref: float | None) -> None:
    if rank != 0:
        return
    comm = pm.comm_stats.total()
    if args.metrics:
        row = {"step": step + 1, "loss": loss, "seconds": elapsed, "tokens_per_s": args.batch * args.seq / elapsed,
               "comm_bytes_per_rank": comm}
        with open(args.metrics, "a") as f:
            f.write(json.dumps(row | ({"reference_loss": ref} if ref is not None else {})) + "\n")
    check = f"  one device {ref:.6f}" if ref is not None else ""
    print(f"step {step + 1}/{args.steps}  loss {loss:.6f}{check}  tokens/s {args.batch * args.seq / elapsed:,.0f}  "
          f"comm {comm / 2**20:.3f} MiB/rank", flush=True)
    if ref is not None:
        check_loss(step, loss, ref)


def check_loss(step: int, loss: float, ref: float) -> None:
    """--check: raise CheckError when step `step` (0-based) lost more than fp32 noise against one device."""
    if not abs(loss - ref) <= CHECK_RTOL * abs(ref):  # a NaN fails too
        raise CheckError(f"--check: step {step + 1} loss {loss:.6f} differs from one device's {ref:.6f} "
                         f"(relative {abs(loss - ref) / abs(ref):.2e} > {CHECK_RTOL:g})")

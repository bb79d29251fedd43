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
from . import materialize
from .data import ShardedLoader, TokenStream
from .executor import ParallelModel
from .grad_clip import clip_grad_norm_, grad_pieces
from .pipeline import PipelineRunner, full_mesh
from .process_groups import AxisGroup, MeshGroups, init_distributed
from .verify import verify, verify_tokens
from .zero import ZeroAdamW, state_bytes

CHECK_RTOL = 1e-4  # fp32 over a few AdamW steps: the ranks sum in a different order than one device


class CheckError(RuntimeError):
    """`meshplan run --check`: a step's loss differs from the single-device run's."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags this loop adds to `meshplan run`."""
    from ..cli_args import number

    p.add_argument("--init", choices=("full", "meta"), default="full", help="full: every rank builds the whole "
                   "model and keeps its shards; meta: the model is built on the meta device and each rank allocates "
                   "and fills only its shards, with the same seeded values (runtime/materialize.py)")
    p.add_argument("--no-zero", action="store_true", help="keep the whole AdamW state of its shards on every rank "
                   "(default: ZeRO-1, each parameter's state sharded over the ranks that hold a replica of it, as "
                   "the planner prices it)")
    p.add_argument("--clip-grad", type=number(0.0, 1e9), default=1.0, metavar="MAX_NORM", help="clip the global "
                   "gradient norm (every element once, under any plan) to MAX_NORM before each step (default 1.0, "
                   "as torchtitan and Megatron-LM; 0: no clipping)")
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
    p.add_argument("--no-overlap-grad-reduce", action="store_true", help="reduce the gradients after the whole "
                   "backward (default: each bucket's reduction is issued from the backward as soon as its last "
                   "gradient has accumulated, as the planner prices it; bit-identical results; pipeline plans "
                   "always reduce after their micro-batches)")
    p.add_argument("--grad-bucket-mb", type=number(1e-3, 1e6), default=25.0, metavar="MB", help="gradient bucket "
                   "size: each bucket is one reduction (default 25, torch DDP's; smaller buckets are issued earlier "
                   "in the backward)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint DIR "
                   "(saved under any plan and world size) up to --steps in all")


def _microbatches(plan: Plan, local_batch: int, asked: int | None) -> int:
    m = asked or plan.pipeline.microbatches
    if asked and local_batch % asked:
        raise PlanError(f"--microbatches: {asked} does not divide each data-parallel rank's {local_batch} sequences")
    while local_batch % m:
        m -= 1
    return m


def build(cfg, args: argparse.Namespace, head: str):
    """(the model, its weight source): built and seeded in full, or with --init meta on the meta device with
    materialize.seeded_init, which gives each rank's shards the values the full build holds."""
    if getattr(args, "init", "full") != "meta":
        return build_model(cfg, head=head, seed=args.seed), None
    model = build_model(cfg, head=head, device="meta")
    return model, materialize.seeded_init(model, args.seed)


class Optimizer:
    """`meshplan run`'s AdamW over pm's shards: ZeRO-1 (zero.ZeroAdamW) unless --no-zero, then the gradient
    reduction, global-norm clipping (--clip-grad) and the step in one call. extra_axes: mesh axes outside pm's
    (a pipeline's pp), over which the gradient norm is summed too."""

    def __init__(self, pm: ParallelModel, args: argparse.Namespace, extra_axes: tuple[AxisGroup, ...] = ()):
        self.pm, self.max_norm, self.axes = pm, getattr(args, "clip_grad", 0.0), [*extra_axes, *pm.axes]
        self.zero = None if getattr(args, "no_zero", False) else \
            ZeroAdamW(pm, lr=args.lr, bucket_mb=getattr(args, "grad_bucket_mb", 25.0))
        # foreach: one DTensor dispatch per AdamW op for all the parameters, instead of one per parameter (torch's
        # default on CPU; 6x slower over DTensors, docs/runtime.md)
        self.opt = self.zero or torch.optim.AdamW(pm.parameters(), lr=args.lr, foreach=True)  # checkpoint.py saves it

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> float | None:
        """Reduce the gradients, clip them, step; the global gradient norm before clipping (None without)."""
        if self.zero is not None:
            self.zero.reduce_gradients()
            pieces = self.zero.grad_pieces()
        else:
            self.pm.reduce_gradients()
            pieces = grad_pieces(self.pm)
        norm = clip_grad_norm_(pieces, self.max_norm, self.axes, self.pm.comm_stats).item() if self.max_norm \
            else None
        self.opt.step()
        return norm

    def state_bytes(self) -> int:
        """Bytes of AdamW state on this rank."""
        return state_bytes(self.zero.optimizer if self.zero is not None else self.opt)


class _Reference:
    """The single-device model on the same global batches, for --check."""

    def __init__(self, cfg, args):
        self.model = build_model(cfg, head="lm", seed=args.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.max_norm = getattr(args, "clip_grad", 0.0)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        loss = F.cross_entropy(self.model(tokens).flatten(0, 1).float(), targets.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.opt.step()
        return loss.item()


def train(args: argparse.Namespace) -> list[float]:
    """One rank's loop (torch.distributed already initialised, or initialised here from env://)."""
    rank, world = init_distributed(None if args.backend == "auto" else args.backend, args.timeout)
    cfg = load_config(args.model)
    plan = Plan.from_yaml(args.plan)
    model, init = build(cfg, args, "lm")
    graph = trace(model)
    runner = None
    if plan.pipeline.enabled:
        if getattr(args, "compile", False):
            raise PlanError(f"--compile: pipeline stages run eagerly (plan.mesh.pp={plan.pipeline.stages})")
        if getattr(args, "verify", False):
            raise PlanError(f"--verify: runtime/verify.py checks one ParallelModel, not pipeline stages "
                            f"(plan.mesh.pp={plan.pipeline.stages}); use --check, which compares every step's loss")
        runner = PipelineRunner(model, plan, graph, groups=MeshGroups.from_world(full_mesh(plan), args.timeout),
                                init=init)
        pm = runner.model
    else:
        pm = ParallelModel(model, plan, graph, timeout_s=args.timeout, init=init,
                           compile=getattr(args, "compile", False),
                           overlap_grad_reduce=not getattr(args, "no_overlap_grad_reduce", False),
                           bucket_mb=getattr(args, "grad_bucket_mb", 25.0))
        if getattr(args, "verify", False):
            report = verify(pm, model, graph, verify_tokens(graph, torch.zeros(args.batch, args.seq).long()))
            if rank == 0:
                print(f"meshplan run: {report}", flush=True)
    stream = TokenStream.from_file(args.data, cfg.vocab_size, args.data_dtype) if args.data else \
        TokenStream.synthetic(cfg.vocab_size, args.seed + 1)
    loader = ShardedLoader(stream, args.batch, args.seq, pm.input_placement(), pm.axes, seed=args.seed)
    m = _microbatches(plan, loader.rows[1] - loader.rows[0], args.microbatches) if runner else 1
    reference = _Reference(cfg, args) if args.check and rank == 0 else None
    opt = Optimizer(pm, args, (runner.pp,) if runner else ())
    first = _resume(args, pm, opt.opt, rank)
    if rank == 0:
        lowered = f", the plan's {plan.pipeline.microbatches} does not divide each data-parallel rank's batch" \
            if runner and not args.microbatches and m != plan.pipeline.microbatches else ""
        pipe = f", {plan.pipeline.stages} stages x {m} micro-batches ({plan.pipeline.schedule}{lowered})" \
            if runner else ""
        sync = "overlapped with backward" if pm.grad_launcher is not None else "after backward"
        print(f"meshplan run: {cfg.name} on {world} ranks ({pm.groups.backend}), {plan.summary()}{pipe}; gradient "
              f"reduction {sync}; data: "
              f"{stream.name}, each rank reads {tuple(loader.rows)} x {tuple(loader.cols)} of [{args.batch}, "
              f"{args.seq}]", flush=True)
    losses = []
    for step in range(first, args.steps):
        tokens, targets = loader.batch_at(step)
        pm.comm_stats.reset()
        start = time.perf_counter()
        opt.zero_grad()
        if runner is not None:
            loss = runner.step(tokens, targets, local=True, microbatches=m)
        else:
            out = pm.loss(tokens, targets, local=True)
            out.backward()
            loss = out.item()
        norm = opt.step()
        if pm.groups.device.type == "cuda":
            torch.cuda.synchronize(pm.groups.device)
        elapsed = time.perf_counter() - start
        losses.append(loss)
        _report(args, rank, step, loss, elapsed, pm, reference and reference.step(*loader.global_batch(step)),
                {"grad_norm": norm, "optimizer_state_bytes": opt.state_bytes()})
        _maybe_save(args, pm, opt.opt, step + 1, rank)
    if rank == 0 and getattr(args, "comm", False):
        print(pm.comm_stats.table(), flush=True)
    if rank == 0:
        zero = "ZeRO-1" if opt.zero is not None else "no ZeRO"
        print(f"meshplan run: AdamW state on rank 0: {opt.state_bytes() / 2**20:.3f} MiB ({zero})", flush=True)
    dist.barrier()
    return losses


def _resume(args, pm: ParallelModel, opt: torch.optim.Optimizer | ZeroAdamW, rank: int) -> int:
    """--resume: load the latest checkpoint into pm and opt; the step to continue from (0 without --resume)."""
    if not getattr(args, "resume", False):
        return 0
    from . import checkpoint

    path = checkpoint.latest(args.checkpoint)
    step = checkpoint.load(pm, opt, path)
    if rank == 0:
        print(f"meshplan run: resumed from {path} (step {step})", flush=True)
    return step


def _maybe_save(args, pm: ParallelModel, opt: torch.optim.Optimizer | ZeroAdamW, step: int, rank: int) -> None:
    every = getattr(args, "checkpoint_every", 0)
    if not getattr(args, "checkpoint", None) or not (step == args.steps or (every and step % every == 0)):
        return
    from . import checkpoint

    path = checkpoint.save(pm, opt, args.checkpoint, step)
    if rank == 0:
        print(f"meshplan run: saved {path}", flush=True)


def _report(args, rank: int, step: int, loss: float, elapsed: float, pm: ParallelModel, ref: float | None,
            extra: dict | None = None) -> None:
    if rank != 0:
        return
    comm = pm.comm_stats.total()
    if args.metrics:
        row = {"step": step + 1, "loss": loss, "seconds": elapsed, "tokens_per_s": args.batch * args.seq / elapsed,
               "comm_bytes_per_rank": comm, **(extra or {})}
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

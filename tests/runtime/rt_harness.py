"""Shared by the runtime tests: random configs and plans, the single-device reference, and the rank-side check.

Everything a spawned worker calls lives here (a module, not a test file), so the worker processes can import it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from meshplan.ir import Mesh, OpPlan, Plan, trace
from meshplan.ir import graph as G
from meshplan.ir.placement import Replicate
from meshplan.ir.strategies import BATCH, STRATEGIES, divisibility_error
from meshplan.models import ModelConfig, build_model
from meshplan.runtime import LocalWorld, ParallelModel

RTOL, ATOL = 1e-5, 1e-6
# float64 runs: a plan differs from one device only by summation order (~1e-16 relative per op; the model
# accumulates in float64 too, moe_transformer.accumulation_dtype). 1e-10 fails any float32 rounding (~1e-7).
RTOL64, ATOL64 = 1e-10, 1e-12


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return (RTOL64, ATOL64) if dtype == torch.float64 else (RTOL, ATOL)
MESHES = {"1": Mesh.of(mp=1), "2": Mesh.of(mp=2), "dp2": Mesh.of(dp=2), "dp2,mp2": Mesh.of(dp=2, mp=2),
          "4": Mesh.of(mp=4)}
DP_ONLY = {"dp2"}  # meshes whose axes are all data parallel


def tiny_config(**over) -> ModelConfig:
    base = dict(name="t", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, n_experts=4,
                top_k=2, max_seq_len=32)
    base.update(over)
    return ModelConfig(**base)


def random_config(rng: random.Random, divisor: int = 1) -> ModelConfig:
    """A random small config whose heads, experts and hidden sizes `divisor` ranks can split (every sharding
    strategy applies on a model axis of that size: no draw is rejected)."""
    n_heads = rng.choice([h for h in (2, 4, 8) if h % divisor == 0])
    n_layers = rng.choice([1, 2])
    n_experts = rng.choice([e for e in (2, 4, 8) if e % divisor == 0])
    return ModelConfig(
        name="rand", vocab_size=rng.choice([32, 64]), dim=n_heads * rng.choice([4, 8]), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=rng.choice([d for d in (1, 2, 4, 8) if n_heads % d == 0]),
        ffn_dim=rng.choice([8, 16]), n_experts=n_experts, top_k=rng.randint(1, min(3, n_experts)),
        n_shared_experts=rng.choice([0, 0, 1]), n_dense_layers=rng.choice([0, 0, 1]) if n_layers > 1 else 0,
        norm_topk_prob=rng.random() < 0.7, capacity_factor=rng.choice([None, None, 0.5, 1.0, 1.5]),
        tie_embeddings=rng.random() < 0.2, max_seq_len=16)


# ---- plans ----------------------------------------------------------------------------------------------
def op_plan(op, mesh: Mesh, strategy: str, axis: str | None, io_index: int = 0) -> OpPlan:
    i, o = STRATEGIES[op.kind][strategy].io[io_index]
    place = lambda p: tuple(p if a == axis else BATCH for a in mesh.names)  # noqa: E731
    return OpPlan(strategy, axis, place(i), place(o))


def uniform_plan(graph, mesh: Mesh, strategies: dict[str, str], axis: str | None = "last",
                 precision: dict[str, str] | None = None) -> Plan:
    """Plan.build; axis=None makes every op data parallel on every axis."""
    return Plan.build(graph, mesh, strategies, axis="auto" if axis == "last" else axis, precision=precision)


def random_plan(graph, mesh: Mesh, rng: random.Random, dp_only: bool = False) -> Plan:
    """Every op gets a random strategy that divides its sizes, on a random model axis (or none)."""
    ops = {}
    for op in graph.ops():
        if op.kind in (G.INPUT, G.OUTPUT):
            continue
        axis = None if dp_only else rng.choice(list(mesh.names) + [None])
        size = mesh.axis_size(axis) if axis else 1
        valid = [s for s in STRATEGIES[op.kind] if divisibility_error(op, s, axis or "-", size) is None]
        strategy = rng.choice(valid)
        ops[op.name] = op_plan(op, mesh, strategy, axis, rng.randrange(len(STRATEGIES[op.kind][strategy].io)))
    return Plan(graph.name, mesh, ops)


# ---- reference and comparison ----------------------------------------------------------------------------
def batch_for(cfg: ModelConfig, batch: int, seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def loss_of(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1), targets.flatten())
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # a value head: any non-uniform loss
    return (out * w).sum() + (out ** 2).mean()


def make_model(cfg: ModelConfig, head: str = "lm", dtype: torch.dtype = torch.float32):
    return build_model(cfg, head=head, seed=0).to(dtype)


def reference(cfg, head, tokens, targets, dtype=torch.float32) -> tuple[float, dict[str, torch.Tensor]]:
    model = make_model(cfg, head, dtype)
    loss = loss_of(model(tokens), targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rank_step(pm: ParallelModel, tokens, targets) -> tuple[float, dict[str, torch.Tensor]]:
    loss = loss_of(pm(tokens), targets)
    loss.backward()
    pm.reduce_gradients()
    return loss.item(), pm.full_grads()


def mismatches(loss, grads, ref_loss, ref_grads, rtol=RTOL, atol=ATOL) -> list[str]:
    bad = []
    if abs(loss - ref_loss) > atol + rtol * abs(ref_loss):
        bad.append(f"loss {loss} != {ref_loss}")
    if set(grads) != set(ref_grads):
        bad.append(f"gradient names differ: {sorted(set(grads) ^ set(ref_grads))}")
    for name, ref in ref_grads.items():
        g = grads.get(name)
        if g is not None and not torch.allclose(g.to(ref.dtype), ref, rtol=rtol, atol=atol):
            err, top = (g - ref).abs().max().item(), ref.abs().max().item()
            bad.append(f"grad {name}: max err {err:.3g} (max |ref| {top:.3g})")
    return bad


def check_threads(cfg, plan: Plan, head="lm", batch=4, seq=8, dtype=torch.float32, graph=None,
                  rtol=None, atol=None) -> list[str]:
    """Run `plan` on an in-process world and compare every rank's loss and full gradients with one device, at
    the tolerance of `dtype` unless given."""
    rtol, atol = rtol or tolerance(dtype)[0], atol or tolerance(dtype)[1]
    tokens, targets = batch_for(cfg, batch, seq)
    ref_loss, ref_grads = reference(cfg, head, tokens, targets, dtype)
    graph = graph or trace(make_model(cfg, head, dtype))
    world = LocalWorld(plan.mesh.size, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg, head, dtype), plan, graph=graph, groups=groups[r])
        return rank_step(pm, tokens, targets)

    out = []
    for r, (loss, grads) in enumerate(world.run(rank)):
        out += [f"rank {r}: {m}" for m in mismatches(loss, grads, ref_loss, ref_grads, rtol, atol)]
    return out


# ---- spawned workers (torch.distributed initialised by meshplan.runtime.launch.spawn) ------------------------
def matrix_worker(rank: int, world: int, jobs: list[dict], outdir: str) -> None:
    """Run every job's plan on this world; write this rank's mismatches per job to outdir/rank{r}.json."""
    torch.manual_seed(0)
    report, graphs, refs = {}, {}, {}
    for job in jobs:
        cfg = ModelConfig(**job["config"])
        key = (repr(cfg), job["batch"], job["seq"])
        tokens, targets = batch_for(cfg, job["batch"], job["seq"])
        if key not in refs:
            refs[key] = reference(cfg, "lm", tokens, targets)
            graphs[key] = trace(make_model(cfg))
        ref_loss, ref_grads = refs[key]
        plan = Plan.from_yaml(job["plan"])
        pm = ParallelModel(make_model(cfg), plan, graph=graphs[key], timeout_s=60)
        loss, grads = rank_step(pm, tokens, targets)
        report[job["label"]] = {"bad": mismatches(loss, grads, ref_loss, ref_grads), "loss": loss,
                                "bytes": pm.comm_stats.total()}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(report))


def replicated(mesh: Mesh):
    return tuple(Replicate() for _ in mesh.names)


def dying_worker(rank: int, world: int, port: int, die_rank: int, timeout_s: float) -> None:
    """Rank `die_rank` exits abruptly after the forward pass; the others are inside the backward's collectives."""
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    mesh = Mesh.of(dp=world // 2, mp=2) if world % 2 == 0 else Mesh.of(dp=world)
    plan = uniform_plan(graph, mesh, {"attention": "sp", "moe": "ep"}, axis="last" if world % 2 == 0 else None)
    pm = ParallelModel(make_model(cfg), plan, graph=graph, timeout_s=timeout_s)
    tokens, targets = batch_for(cfg, world, 8)
    loss = loss_of(pm(tokens), targets)
    if rank == die_rank:
        os._exit(17)
    loss.backward()
    pm.reduce_gradients()
    dist.barrier()

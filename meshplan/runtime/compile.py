"""torch.compile for ParallelModel: each op's parallel implementation is compiled on its own, fullgraph=True.

The op is meshplan's block (an attention, an FFN, a norm: what torchtitan's `apply_compile` compiles per
TransformerBlock), so a compiled op is one graph with its collectives in it: torch's functional collectives
(collectives.py) trace as `_c10d_functional` ops. Backward goes through AOTAutograd's compiled backward, with
funcol's own backward formulas (the gradient convention of collectives.py).

Bytes: a booking inside a traced graph would be a side effect that dynamo replays by guarding on the counters'
values (a recompile per step), so a compiled op runs with no CommStats (its channels book nothing). Instead
`CompiledOp` runs an op eagerly the first time it sees a call signature (input shapes, dtypes, whether grads
flow), keeps the bookings that call made (forward and, as collectives.py books them at forward time, backward), and
replays them after every compiled call with the same signature: the same collectives on the same shapes send the
same bytes. (Not torch.compiler.is_compiling(): its flag is process-wide, so in a world of rank threads one rank's
compilation would silence the others' eager bookings.)

Ops that stay eager, and why (`EAGER`): an MoE layer's experts run as one GEMM group per expert over the rows
routed to it (moe_routing.run_experts: `counts.tolist()` and a Python loop that skips empty experts), and under
expert parallelism the dispatch's row counts are exchanged and turned into all-to-all split sizes
(`.tolist()`); both are data-dependent control flow that a full graph cannot hold (with
`capture_scalar_outputs` the splits trace, but the per-expert loop still needs the counts as Python ints). Generic
ops (residual adds, reshapes) run their fx nodes eagerly: they are the glue between compiled ops.

Compressed channels (bf16/fp8 wire formats) go through thin autograd Functions whose backward books its bytes when
it runs; `compile=True` refuses a plan with one (not yet checked under compile).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..ir import graph as G
from ..ir.plan import Plan, PlanError
from .comm_stats import Key
from .op_context import OpContext

EAGER = {G.MOE: "the experts' per-expert GEMM loop (and EP's dispatch split sizes) depend on the routing"}

_COMPILED: dict[Callable, Callable] = {}


def compiled(impl: Callable) -> Callable:
    """impl compiled fullgraph=True (one wrapper per implementation; dynamo caches graphs per code object and guards
    on the op's module, shapes and group names, so each op and rank gets its own graph)."""
    if impl not in _COMPILED:
        _COMPILED[impl] = torch.compile(impl, fullgraph=True)
    return _COMPILED[impl]


class _Recorder:
    """Collects a call's bookings as CommStats.add receives them (key, bytes), to replay one for one."""

    def __init__(self) -> None:
        self.enabled, self.log = True, []

    def add(self, key: Key, nbytes: int) -> None:
        self.log.append((key, nbytes))


class CompiledOp:
    """One op's implementation, compiled; books each call's bytes as its first (eager) call of that signature did."""

    def __init__(self, impl: Callable):
        self.impl, self.fn = impl, compiled(impl)
        self.bookings: dict[tuple, list[tuple[Key, int]]] = {}
        self.compiled_calls = 0  # calls that ran the compiled graph (not the first, eager one of a signature)

    def __call__(self, ctx: OpContext, *ins: torch.Tensor) -> torch.Tensor:
        sig = (torch.is_grad_enabled(), *((tuple(t.shape), t.dtype, t.requires_grad) for t in ins),
               *((tuple(t.shape), t.requires_grad) for t in ctx.params.values()))
        if sig not in self.bookings:
            rec = _Recorder()
            out = self.impl(dataclasses.replace(ctx, stats=rec), *ins)
            self.bookings[sig] = rec.log
        else:
            out = self.fn(dataclasses.replace(ctx, stats=None), *ins)
            self.compiled_calls += 1
        if ctx.stats is not None:
            for key, nbytes in self.bookings[sig]:
                ctx.stats.add(key, nbytes)
        return out


def wants_compile(kind: str) -> bool:
    return kind not in EAGER and kind != G.GENERIC


def check_compilable(plan: Plan) -> None:
    """compile=True needs every channel uncompressed (see the module docstring)."""
    for name, p in plan.ops.items():
        compressed = {tag: prec for tag, prec in p.precision.items() if prec != "fp32" and tag != "grad"}
        if compressed:
            raise PlanError(f"plan.ops[{name!r}].precision {compressed}: compile=True supports fp32 wire formats "
                            f"only (a compressed channel's backward bytes cannot be counted in a compiled graph)")

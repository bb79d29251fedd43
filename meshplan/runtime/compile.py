"""torch.compile for ParallelModel: each op's parallel implementation is compiled on its own, fullgraph=True.

The op is meshplan's block (an attention, an FFN, a norm: what torchtitan's `apply_compile` compiles per
TransformerBlock), so a compiled op is one graph with its collectives in it: torch's functional collectives
(collectives.py) trace as `_c10d_functional` ops. Backward goes through AOTAutograd's compiled backward, with
funcol's own backward formulas (the gradient convention of collectives.py).

Bytes: each compiled call books its own. The op runs with a fresh `_Bookings` as its CommStats; inside the trace
the channels' `record` calls append (key, bytes) to it, and dynamo replays those appends after the graph runs,
with the byte counts the graph computed from this call's shapes and split sizes (a fresh list per call: nothing
for dynamo to guard on, so no recompiles). So an expert-parallel exchange, whose uneven all-to-all splits change
with every routing, books what this step sent, as eager does. (Not CommStats itself: its `+=` into running totals
would make dynamo guard on the counters' values and recompile every step. Not torch.compiler.is_compiling(): its
flag is process-wide, so in a world of rank threads one rank's compilation would silence the others' bookings.)

Data-dependent sizes. MoE ops have them: the kept assignments under a capacity factor (`nonzero`), one rank's own
assignments under "ag_scatter" (a boolean mask), the rows per expert that split the sorted rows into one GEMM per
expert, and under expert parallelism the all-to-all split sizes (`.tolist()` of exchanged counts). A compiled call
runs under dynamo's `capture_scalar_outputs` and `capture_dynamic_output_shape_ops` (thread-local patches, so
rank threads do not race), which trace them as unbacked SymInts: funcol's all_to_all_single takes SymInt splits,
and `torch._check` (moe_routing.split_sizes) tells the tracer they are sizes. One graph then serves every
routing; dynamo specialises on the rank (its index and group names), not on the data. Generic ops (residual
adds, reshapes) run their fx nodes eagerly: they are the glue between compiled ops.

Compressed channels (bf16/fp8 wire formats) go through thin autograd Functions whose backward books its bytes when
it runs; `compile=True` refuses a plan with one (not yet checked under compile).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Callable

import torch

from ..ir import graph as G
from ..ir.plan import Plan, PlanError
from .comm_stats import Key
from .op_context import OpContext

_COMPILED: dict[tuple, Callable] = {}


def compiled(impl: Callable, rank: tuple) -> Callable:
    """impl compiled fullgraph=True, for one rank. Dynamo keeps graphs per code object (guarding on the op's shapes,
    parameters and group names, so each op kind gets a graph per shape, shared by the layers), and stops at
    `recompile_limit` graphs per code object: each rank compiles its own copy of impl's code, so that a world of
    rank threads (tests) holds each rank's graphs apart, as a world of processes does."""
    key = (impl, rank)
    if key not in _COMPILED:
        own = types.FunctionType(impl.__code__.replace(), impl.__globals__, impl.__name__, impl.__defaults__,
                                 impl.__closure__)
        _COMPILED[key] = torch.compile(own, fullgraph=True)
    return _COMPILED[key]


class _Bookings:
    """A compiled call's CommStats: each booking (key, bytes) in order, to add to the real CommStats after it."""

    def __init__(self) -> None:
        self.log: list[tuple[Key, int]] = []

    def add(self, key: Key, nbytes: int) -> None:
        self.log.append((key, nbytes))


class CompiledOp:
    """One op's implementation, compiled; books the bytes each call's graph computed (see the module docstring)."""

    def __init__(self, impl: Callable):
        self.impl, self.calls = impl, 0

    def __call__(self, ctx: OpContext, *ins: torch.Tensor) -> torch.Tensor:
        bookings = _Bookings()
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            fn = compiled(self.impl, tuple((g.group_name, g.index) for g in ctx.axes))
            out = fn(dataclasses.replace(ctx, stats=bookings), *ins)
        self.calls += 1
        if ctx.stats is not None:
            for key, nbytes in bookings.log:
                ctx.stats.add(key, nbytes)
        return out


def wants_compile(kind: str) -> bool:
    return kind != G.GENERIC


def check_compilable(plan: Plan) -> None:
    """compile=True needs every channel uncompressed (see the module docstring)."""
    for name, p in plan.ops.items():
        compressed = {tag: prec for tag, prec in p.precision.items() if prec != "fp32" and tag != "grad"}
        if compressed:
            raise PlanError(f"plan.ops[{name!r}].precision {compressed}: compile=True supports fp32 wire formats "
                            f"only (a compressed channel's backward bytes cannot be counted in a compiled graph)")

"""What one op becomes in a training step: its phases, by strategy, with per-rank FLOPs and bytes.

The phases are the strategy's (ir/strategies: names, order, each collective's kind and elements). An op whose
strategy has collectives inside it is split at them, so that a scheduler can run one micro-batch chunk's
collective while another chunk computes (MegaScale-MoE's inter-operator overlap, docs/reference.md "Overlap"):
  EP MoE:            route -> dispatch (all-to-all) -> experts -> combine (all-to-all) -> unpermute,
                     with shared experts (when the model has them) beside the all-to-alls;
  Ulysses attention: qkv -> qkv_a2a (all-to-all) -> core -> out_a2a (all-to-all) -> out_proj;
  vocab embedding:   ids (all-gather of sequence-sharded token ids) -> compute.
Every other op is one "compute" phase; the collectives between ops (TP's all-gather and reduce-scatter) are the
plan's edge reshardings, built by task_graph.py. All numbers are forward, per rank, for the whole step (before
splitting into chunks). A collective's `nbytes` is the tensor it moves as its group sees it (see
durations.wire_bytes for what one rank sends).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy

from ..ir import graph as G
from ..ir.graph import Graph, N, Op, dtype_size
from ..ir.placement import Shard
from ..ir.plan import Plan, evaluate_shape
from ..ir.strategies import (
    COMPUTE as COMPUTE_PHASE,
)
from ..ir.strategies import (
    PRECISION_BYTES,
    strategy_of,
)

COMPUTE, COMM = "compute", "comm"
STREAMS = (COMPUTE, COMM)

# The gradient of a forward collective is the mirror collective (DTensor's redistribute backward, Megatron's f/g):
# an all-gather's gradient is a reduce-scatter and back; an all-to-all's is the inverse all-to-all; an all-reduce
# of a partial sum passes its (replicated) gradient through; a local slice's gradient must be all-gathered.
MIRROR = {"all_to_all": "all_to_all", "all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
          "all_reduce": None, "slice": "all_gather", None: None}
DDP_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket_cap_mb


@dataclass(frozen=True)
class Phase:
    name: str
    stream: str  # COMPUTE or COMM
    flops: float = 0.0  # forward FLOPs on one rank
    mem_bytes: float = 0.0  # activations and weights one rank reads and writes (the roofline's memory term)
    collective: str | None = None  # all_to_all | all_gather | reduce_scatter | all_reduce (COMM only)
    nbytes: float = 0.0  # the tensor the collective moves, as its group sees it
    axes: tuple[str, ...] = ()  # mesh axes the collective spans
    group: int = 1  # ranks in the collective's group
    after: tuple[str, ...] = ()  # phases of the same op it waits for; () means the op's inputs
    gemm_dims: tuple[float, ...] = ()  # its main GEMM on one rank (rows, inner, columns), for the size efficiency
    grad: bool = True  # a collective whose backward runs its mirror (not so for integer token ids)


class OpView:
    """One op of the plan at a concrete batch and sequence length: the sizes every phase formula needs."""

    def __init__(self, graph: Graph, plan: Plan, op: Op, batch: int, seq: int):
        self.graph, self.plan, self.op, self.batch, self.seq = graph, plan, op, batch, seq
        self.p = plan.ops[op.name]
        mesh = plan.mesh
        self.n = mesh.axis_size(self.p.axis) if self.p.axis is not None else 1
        # Ranks that split this op's work: all of them, except that "replicate" repeats the work across its axis.
        self.div = mesh.size // self.n if self.p.strategy == "replicate" else mesh.size
        self.dp = mesh.size // self.n  # data-parallel ranks: the batch is split over every axis but the model axis
        self.act = dtype_size(op.output.dtype) if op.output is not None else 4

    @property
    def tokens(self) -> int:
        """Rows of the first input (B·S of the whole, global step) for ops taking [B, S, features]."""
        t = 1
        for d in evaluate_shape(self.op.input_metas[0].shape, self.batch, self.seq)[:-1]:
            t *= d
        return t

    def flops(self) -> float:
        return float(self.graph.evaluate(self.op.flops, self.batch, self.seq))

    def local(self, meta, placements) -> float:
        """Bytes of a tensor on one rank, given its placement on each mesh axis."""
        total = float(self.graph.evaluate(meta.nbytes, self.batch, self.seq))
        for (_, size), pl in zip(self.plan.mesh.axes, placements):
            if isinstance(pl, Shard):
                total /= size
        return total

    def io_bytes(self) -> float:
        ins = sum(self.local(m, self.p.input) for m in self.op.input_metas)
        return ins + (self.local(self.op.output, self.p.output) if self.op.output is not None else 0.0)

    def model_io(self):
        """The op's (input, output) placements on its model axis."""
        i = self.plan.mesh.index(self.p.axis)
        return self.p.input[i], self.p.output[i]

    def elements(self, expr) -> float:
        """A strategy's element count (ir/strategies: B sequences of S tokens per data-parallel replica, n the
        model axis) at this step: B = the batch over the data-parallel ranks."""
        return float(sympy.sympify(expr).subs({G.B: self.batch // self.dp, G.S: self.seq, N: self.n}))

    def comm_bytes(self, collective: str) -> int:
        """Element size on the wire: the plan's precision for this collective, else the activation's dtype."""
        prec = self.p.precision.get(collective)
        return PRECISION_BYTES[prec] if prec else self.act


# ---- parameters and their gradient reductions ------------------------------------------------------------------
def param_split(op: Op, strategy: str, n: int) -> tuple[int, int]:
    """(elements of the parameters split over a model axis of size n, counted whole; elements every rank of the
    axis holds whole): the strategy's parameter layout (ir/strategies)."""
    strat = strategy_of(op.kind, strategy)
    if strat is None or not op.params:
        return 0, op.params
    split, whole = (sympy.sympify(x).subs(N, n) for x in strat.layout(op))
    return round(float(split) * n), int(whole)


def grad_phases(v: OpView, bucket_bytes: float = DDP_BUCKET_BYTES) -> list[Phase]:
    """Data-parallel gradient reductions of one op (all-reduces), issued after the op's whole backward.

    Split parameters reduce over the data-parallel axes; whole ones also over the model axis when its ranks saw
    different tokens (sequence- or batch-sharded input), as SP's replicated attention weights do (docs/reference.md,
    "Communication volumes").
    A reduction larger than `bucket_bytes` is cut into buckets ("grad.0", "grad.1", ...) as DDP does: one
    collective cannot be preempted, so a single multi-GB reduction would hold the comm stream while the next
    layer's all-to-all waits.
    """
    mesh, p = v.plan.mesh, v.p
    split, whole = param_split(v.op, p.strategy, v.n)
    dp_axes = tuple(a for a, s in mesh.axes if a != p.axis and s > 1)
    model_sharded = p.axis is not None and v.n > 1 and isinstance(p.input[mesh.index(p.axis)], Shard)
    elem = PRECISION_BYTES[p.precision["grad"]] if "grad" in p.precision else dtype_size(v.op.param_dtype)
    groups = [("grad", split / max(v.n, 1), dp_axes),
              ("grad_whole" if split else "grad", whole, dp_axes + ((p.axis,) if model_sharded else ()))]
    out = []
    for name, count, axes in groups:
        size = 1
        for a in axes:
            size *= mesh.axis_size(a)
        if count and size > 1:
            axes = tuple(a for a in mesh.names if a in axes)  # mesh order, outermost first
            k = max(1, math.ceil(count * elem / bucket_bytes))
            for i in range(k):
                out.append(Phase(f"{name}.{i}" if k > 1 else name, COMM, collective="all_reduce",
                                 nbytes=count * elem / k, axes=axes, group=size))
    return out


# ---- forward phases by strategy ---------------------------------------------------------------------------------
def op_phases(v: OpView) -> list[Phase]:
    """The op's forward phases in a valid order (the strategy's phases, ir/strategies); the last one produces the
    op's output. Collectives carry the strategy's elements at this step's sizes; compute phases the FLOPs and
    bytes of their share of the op (the whole op where the strategy has one compute phase)."""
    strat = strategy_of(v.op.kind, v.p.strategy)
    if strat is None or v.n == 1:
        return [_whole(v)]
    specs = strat.phases(v.op, v.model_io())
    computes = [p for p in specs if not p.comm]
    if len(computes) > 1 and any(p.flops is None for p in computes):
        raise ValueError(f"codegen: {v.op.kind}/{v.p.strategy} has compute phases {[p.name for p in computes]}; "
                         f"state each one's cost (PhaseSpec flops/act/weights/gemm) in its strategy object")
    out = []
    for spec in specs:
        if spec.comm:
            elem = dtype_size(spec.dtype) if spec.dtype else v.comm_bytes(spec.name)
            out.append(Phase(spec.name, COMM, collective=spec.collective, nbytes=v.elements(spec.elements) * elem,
                             axes=(v.p.axis,), group=v.n, after=spec.after, grad=spec.dtype is None))
        elif len(computes) == 1:
            out.append(replace(_whole(v), name=spec.name, after=spec.after))
        else:
            out.append(_share(v, spec))
    return out


def _share(v: OpView, spec) -> Phase:
    """A compute phase's share of the op as its strategy object states it, at this step's sizes."""
    mem = v.elements(spec.act) * v.act + v.elements(spec.weights) * dtype_size(v.op.param_dtype)
    return Phase(spec.name, COMPUTE, v.elements(spec.flops), mem, after=spec.after,
                 gemm_dims=tuple(v.elements(x) for x in spec.gemm))


def _whole(v: OpView) -> Phase:
    split, whole = param_split(v.op, v.p.strategy, v.n)
    weights = (split / v.n + whole) * dtype_size(v.op.param_dtype)
    return Phase(COMPUTE_PHASE, COMPUTE, v.flops() / v.div, v.io_bytes() + weights)

"""What one (op kind, strategy) pair is, as data every stage reads: the Strategy object and its phases.

A strategy acts on one mesh axis, the op's *model axis* (size n); on every other mesh axis the op is data parallel
(activations Shard(0) on batch, parameters replicated, gradients reduced). One Strategy object states, once:
  * its (input, output) placements on the model axis (`io`, the first one native);
  * its parameter layout: parameter name (relative to the op's module) -> the dimension the model axis splits;
    a parameter it does not name is whole on every rank (`split_dim`);
  * the parameters its runtime implementation reads by name (`required`);
  * which op attributes the model axis must divide (`divides`);
  * its phases: an ordered tuple of compute and communication steps; a communication phase names its collective
    and the elements of the tensor it moves (as its group sees it: X in docs/reference.md, "Communication
    volumes") as a sympy expression of the op's attrs and B, S, n (ir/graph.py), for one micro-batch of B
    sequences of S tokens per data-parallel replica.
The runtime's sharding, the planner's parameter counts and collectives, codegen's phases and the emitted code's
names are derived from it (docs/concepts.md, "Adding a strategy"), in the manner of torchtitan's ParallelStyle and
Megatron-Core's token dispatchers: one class owns a strategy's layout and its communication.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import sympy

from ..graph import N, Op
from ..placement import Partial, Placement, Replicate, Shard

SEQ, BATCH = Shard(1), Shard(0)
PRECISIONS = ("fp32", "bf16", "fp8")
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}  # bytes per element on the wire (fp8 scales counted apart)
GRAD = "grad"  # the data-parallel gradient reduction of an op's parameters
# codegen's overlap schedule (codegen/emit.py; priced by planner/overlap.py): an op whose strategy is `chunked` runs
# in CHUNKS micro-batch chunks, each of its collectives beside another chunk's compute phases (PhaseSpec.after
# order) -- when the collective runs asynchronously, which meshplan's runtime does for uncompressed ones only
CHUNKS = 2


def runs_async(precision: str) -> bool:
    """Whether meshplan's runtime issues a collective in this wire precision asynchronously (a compressed one
    decodes inside its synchronous collectives: runtime/async_collectives.py)."""
    return precision == "fp32"

# Phase names: the runtime's channel tags, codegen's task names and the emitted code's variables. Spelled here only.
COMPUTE = "compute"  # the one phase of an op without an internal collective
QKV, QKV_A2A, CORE, OUT_A2A, OUT_PROJ = "qkv", "qkv_a2a", "core", "out_a2a", "out_proj"  # Ulysses attention
ROUTE, DISPATCH, EXPERTS, COMBINE, SHARED, UNPERMUTE = "route", "dispatch", "experts", "combine", "shared", "unpermute"
COUNTS = "counts"  # EP's exchange of per-expert row counts before the dispatch (a few integers, not a phase)
IDS = "ids"  # vocab-parallel embedding: the all-gather of sequence-sharded token ids

IO = tuple[Placement, Placement]
SEQ_IO: tuple[IO, ...] = ((SEQ, SEQ),)
TP_IO: tuple[IO, ...] = ((Replicate(), Partial()),)
REP_IO: tuple[IO, ...] = ((Replicate(), Replicate()),)


@dataclass(frozen=True)
class PhaseSpec:
    """One step of an op's forward on one rank. collective None: compute. Otherwise the collective's kind, the
    elements X of the tensor it moves as its group sees it, and its token rows (fp8 keeps one scale per row)."""
    name: str
    collective: str | None = None  # all_to_all | all_gather | reduce_scatter | all_reduce
    elements: sympy.Expr = sympy.Integer(0)
    rows: sympy.Expr = sympy.Integer(0)
    after: tuple[str, ...] = ()  # phases of the same op it waits for; () means the op's inputs
    dtype: str | None = None  # a fixed wire dtype (token ids); None: the activations', a plan may choose its precision
    routed: bool = False  # rows sent where the router sends them: the most loaded rank sets the time (EP's exchange)
    # A compute phase's share of the op, per rank and forward, in B, S (per data-parallel replica) and n; required
    # where a strategy has more than one compute phase (one compute phase is the whole op): FLOPs, activation
    # elements read and written, parameter elements read, and its main GEMM (rows, inner, columns).
    flops: sympy.Expr | None = None
    act: sympy.Expr = sympy.Integer(0)
    weights: sympy.Expr = sympy.Integer(0)
    gemm: tuple[sympy.Expr, ...] = ()

    @property
    def comm(self) -> bool:
        return self.collective is not None


def one_compute(op: Op, io: IO) -> tuple[PhaseSpec, ...]:
    """The phases of a strategy without an internal collective: one compute phase."""
    return (PhaseSpec(COMPUTE),)


@dataclass(frozen=True)
class Strategy:
    name: str
    io: tuple[IO, ...]  # allowed (input, output) placements on the model axis
    shards: str  # what the model axis splits: "heads", "sequence", "experts", "ffn", "vocab", "none"
    doc: str = ""
    # Plain sequence sharding: each rank runs the op's own code on its slice of the sequence, exact only for
    # token-wise ops (locality.py). sp/ep shard the sequence too but do their own exchange, so they need not.
    needs_token_wise: bool = False
    params: dict[str, int] = field(default_factory=dict)  # parameter name -> dim split on the model axis
    # parameters split by KV head: whole on every rank when the model axis does not divide n_kv_heads (fewer KV
    # heads than ranks: each rank keeps all and uses its own)
    kv_params: frozenset[str] = frozenset()
    splits_kv_heads: bool = False  # the model axis and n_kv_heads must divide one another (the KV rule above)
    required: tuple[str, ...] = ()  # parameters the runtime implementation reads by name
    divides: tuple[tuple[str, str], ...] = ()  # (attr, what it is) the model axis size must divide
    phases: Callable[[Op, IO], tuple[PhaseSpec, ...]] = one_compute
    # collectives of a few integers run synchronously inside a compute phase (EP's row counts inside route): not
    # phases of their own, not priced (a fixed dtype), but counted at run time under their name
    inline: Callable[[Op, IO], tuple[PhaseSpec, ...]] = lambda op, io: ()
    # codegen emits this strategy's op as CHUNKS interleaved micro-batch chunks (its collectives overlap the other
    # chunk's compute): what planner/overlap.py prices for meshplan's own plans
    chunked: bool = False

    @property
    def native(self) -> IO:
        return self.io[0]

    def split_dim(self, op: Op, pname: str, n: int) -> int | None:
        """The dimension of parameter `pname` split over a model axis of size n (None: whole on every rank)."""
        if n == 1:
            return None
        if pname in self.kv_params and op.attrs["n_kv_heads"] % n:
            return None
        return self.params.get(pname)

    def layout(self, op: Op) -> tuple[sympy.Expr, sympy.Expr]:
        """(split, whole) parameter elements one rank holds, symbolic in n: split ones are divided over the model
        axis, whole ones are on every rank of it. From the op's parameter shapes (recorded at trace time)."""
        shapes = op.param_shapes
        if sum(_numel(s) for s in shapes.values()) != op.params:
            raise ValueError(f"op {op.name}: param_shapes cover {sum(_numel(s) for s in shapes.values())} of its "
                             f"{op.params} parameters (trace the model to record them)")
        split, whole = sympy.Integer(0), sympy.Integer(0)
        for pname, shape in shapes.items():
            numel = _numel(shape)
            if pname not in self.params:
                whole += numel
            elif pname in self.kv_params:  # split while n divides the KV heads (n <= n_kv_heads), whole beyond
                fits = N <= op.attrs["n_kv_heads"]
                split += sympy.Piecewise((numel / N, fits), (0, True))
                whole += sympy.Piecewise((0, fits), (numel, True))
            else:
                split += sympy.Integer(numel) / N
        return split, whole

    def comm_phases(self, op: Op, io: IO | None = None) -> tuple[PhaseSpec, ...]:
        return tuple(p for p in self.phases(op, io or self.native) if p.comm)

    def precision_collectives(self, op: Op) -> tuple[str, ...]:
        """Its collectives whose wire precision a plan may choose (over every io variant, in phase order)."""
        names: list[str] = []
        for io in self.io:
            names += [p.name for p in self.comm_phases(op, io) if p.dtype is None and p.name not in names]
        return tuple(names)

    def divisibility_error(self, op: Op, axis: str, size: int) -> str | None:
        if size == 1:
            return None
        for attr, what in self.divides:
            if op.attrs[attr] % size:
                return f"mesh axis {axis}={size} does not divide {what.format(v=op.attrs[attr])}"
        if self.splits_kv_heads:
            kv = op.attrs["n_kv_heads"]
            if kv % size and size % kv:
                return (f"mesh axis {axis}={size} and n_kv_heads={kv} must divide one another "
                        f"(KV heads are split, or replicated when fewer than ranks)")
        return None


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def seq(doc: str = "", required: tuple[str, ...] = ()) -> Strategy:
    """Plain sequence sharding with whole weights: each rank runs the op on its slice of the sequence."""
    return Strategy("seq", SEQ_IO, "none", doc, needs_token_wise=True, required=required)


def replicate(doc: str = "every rank computes the whole op", required: tuple[str, ...] = ()) -> Strategy:
    return Strategy("replicate", REP_IO, "none", doc, required=required)

"""Which parallel strategies each op kind admits, as data every stage shares.

A strategy acts on one mesh axis, the op's *model axis*; on every other mesh axis the op is data parallel
(activations Shard(0) on batch, parameters replicated, gradients reduced). On its model axis a strategy has a
native input and output placement: Megatron-style tensor parallelism takes a replicated input and leaves a partial
sum (the all-gather before and reduce-scatter after are reshardings on the graph's edges, priced and executed like
any other); Ulysses sequence parallelism and expert parallelism take and give sequence-sharded tokens, with their
all-to-alls inside the op. "seq" is plain sequence sharding with replicated weights (Megatron's sequence-parallel
norms and residual adds); "replicate" computes redundantly on every rank of the axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from . import graph as G
from .graph import Op
from .placement import Partial, Placement, Replicate, Shard

SEQ, BATCH = Shard(1), Shard(0)
PRECISIONS = ("fp32", "bf16", "fp8")
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}  # bytes per element on the wire (fp8 scales counted apart)
GRAD = "grad"  # the data-parallel gradient reduction of an op's parameters


@dataclass(frozen=True)
class Strategy:
    name: str
    io: tuple[tuple[Placement, Placement], ...]  # allowed (input, output) placements on the model axis
    shards: str  # what the model axis splits: "heads", "sequence", "experts", "ffn", "vocab", "none"
    collectives: tuple[str, ...] = ()  # op-internal collectives whose precision a plan may choose
    doc: str = ""
    # Plain sequence sharding: each rank runs the op's own code on its slice of the sequence, exact only for
    # token-wise ops (locality.py). sp/ep shard the sequence too but do their own exchange, so they need not.
    needs_token_wise: bool = False

    @property
    def native(self) -> tuple[Placement, Placement]:
        return self.io[0]


_SEQ_IO = ((SEQ, SEQ),)


def _seq(doc: str = "") -> Strategy:
    return Strategy("seq", _SEQ_IO, "none", (), doc, needs_token_wise=True)


_TP_IO = ((Replicate(), Partial()),)
_REP_IO = ((Replicate(), Replicate()),)

STRATEGIES: dict[str, dict[str, Strategy]] = {
    G.ATTENTION: {
        "sp": Strategy("sp", _SEQ_IO, "sequence", ("qkv_a2a", "out_a2a"),
                       "Ulysses: all-to-all q/k/v from sequence- to head-sharded, attention, all-to-all back"),
        "tp": Strategy("tp", _TP_IO, "heads", (), "Megatron TP: heads split, wq/wk/wv column- and wo row-parallel"),
        "replicate": Strategy("replicate", _REP_IO, "none", (), "every rank computes the whole op"),
    },
    G.MOE: {
        "ep": Strategy("ep", _SEQ_IO, "experts", ("dispatch", "combine"),
                       "expert parallel: all-to-all dispatch of routed tokens, local experts, all-to-all combine"),
        "tp": Strategy("tp", _TP_IO, "ffn", (), "every expert's hidden dimension split (w1/w3 column, w2 row)"),
        "ag_scatter": Strategy("ag_scatter", _TP_IO, "experts", (),
                               "all-gather tokens, local scatter to this rank's experts, "
                               "partial sum to reduce-scatter"),
        "seq": _seq("every rank holds all experts and routes its own tokens"),
        "replicate": Strategy("replicate", _REP_IO, "none"),
    },
    G.FFN: {
        "tp": Strategy("tp", _TP_IO, "ffn", (), "w1/w3 column-parallel, w2 row-parallel"),
        "seq": _seq(),
        "replicate": Strategy("replicate", _REP_IO, "none"),
    },
    G.EMBEDDING: {
        "seq": _seq("token ids sequence-sharded, table replicated"),
        "vocab": Strategy("vocab", ((SEQ, Partial()), (Replicate(), Partial())), "vocab",
                          (), "table rows split; rows a rank lacks contribute zeros to a partial sum"),
        "replicate": Strategy("replicate", _REP_IO, "none"),
    },
    G.NORM: {"seq": _seq(), "replicate": Strategy("replicate", _REP_IO, "none")},
    G.LINEAR: {
        "tp": Strategy("tp", _TP_IO, "ffn", (), "weight split on in_features: row-parallel"),
        "seq": _seq(),
        "replicate": Strategy("replicate", _REP_IO, "none"),
    },
    G.LM_HEAD: {"seq": _seq(), "replicate": Strategy("replicate", _REP_IO, "none")},
    # Generic ops are elementwise or unknown: sequence-sharded only where every input and the output agree.
    G.GENERIC: {"seq": _seq(), "replicate": Strategy("replicate", _REP_IO, "none")},
}

# What a plan that names no strategy gets: the Megatron-with-sequence-parallel default for each kind.
DEFAULT_STRATEGY = {G.ATTENTION: "tp", G.MOE: "ep", G.FFN: "tp", G.EMBEDDING: "seq", G.NORM: "seq",
                    G.LINEAR: "seq", G.LM_HEAD: "seq", G.GENERIC: "seq"}


def offered_error(op: Op, strategy: str, io: tuple[Placement, Placement] | None = None,
                  sharded: bool = True) -> str | None:
    """Why meshplan cannot run `op` under `strategy` exactly (None if it can): the runtime has no implementation
    for this op's module, the op mixes sequence positions, or a tensor it shards is not laid out [B, S, ...].
    io: the (input, output) placements on the model axis; None: any of the strategy's io variants will do.
    sharded=False (a 1-wide model axis): every layout coincides, but the strategy's implementation still runs the
    op, so only that is checked."""
    strat = STRATEGIES.get(op.kind, {}).get(strategy)
    if strat is None:
        return f"{strategy!r} is not valid for {op.kind} (valid: {', '.join(STRATEGIES.get(op.kind, {}))})"
    if op.strategies is not None and strategy not in op.strategies:
        return (f"the runtime runs {op.kind}/{strategy} only for meshplan's own blocks, and this op's module "
                f"{'(' + op.why + ') ' if op.why else ''}is run whole (allowed: {', '.join(op.strategies)})")
    if not sharded:
        return None
    if strat.needs_token_wise and not op.token_wise:
        return (f"{strategy} shards the sequence and runs the op on each slice, but the op is not token-wise"
                f"{': ' + op.why if op.why else ''}")
    errors = [_io_layout_error(op, strategy, pair) for pair in ([io] if io is not None else strat.io)]
    return None if any(e is None for e in errors) else errors[0]


def default_strategy(op: Op, sharded: bool = True) -> str:
    """The kind's default strategy where meshplan runs this op exactly (on a model axis wider than 1 when
    `sharded`), else replicate."""
    default = DEFAULT_STRATEGY[op.kind]
    return default if offered_error(op, default, sharded=sharded) is None else "replicate"


def native_io(op: Op, strategy: str) -> tuple[Placement, Placement]:
    """The strategy's first io variant this op's tensors can take (the native one if none can)."""
    strat = STRATEGIES[op.kind][strategy]
    return next((pair for pair in strat.io if _io_layout_error(op, strategy, pair) is None), strat.native)


def _io_layout_error(op: Op, strategy: str, io: tuple[Placement, Placement]) -> str | None:
    if SEQ not in io:
        return None
    for i, m in enumerate(op.input_metas + ([op.output] if op.output is not None else [])):
        if i in op.param_inputs or m is None:
            continue
        if io[0] != SEQ and i < len(op.input_metas) or io[1] != SEQ and i >= len(op.input_metas):
            continue
        if len(m.shape) < 2 or m.shape[0] != G.B or m.shape[1] != G.S:
            return f"{strategy} shards dim 1 as the sequence, but {m} is not laid out [B, S, ...]"
    return None


def layout_error(meta, placement: Placement) -> str | None:
    """Why `meta` cannot be split as `placement` (None if it can): Shard(0) needs the batch as its leading
    factor (a batch-free tensor — a position table, a mask — is the same on every rank and never sharded),
    Shard(1) needs [B, S, ...]."""
    if meta is None or not isinstance(placement, Shard):
        return None
    shape = meta.shape
    if placement.dim == 0:
        d0 = sympy.sympify(shape[0]) if shape else sympy.Integer(1)
        if not (d0 == G.B or (d0.is_Mul and G.B in d0.args)):
            return f"{meta} has no batch dim to shard"
        return None
    if placement.dim == 1 and (len(shape) < 2 or shape[0] != G.B or shape[1] != G.S):
        return f"{meta} is not laid out [B, S, ...]"
    return None if placement.dim <= 1 else f"{placement} is not a placement meshplan shards"


def batch_parallel_error(op: Op) -> str | None:
    """Why data parallelism (each rank runs the op on its own samples) would not be exact for `op`."""
    if op.kind in (G.INPUT, G.OUTPUT) or op.batch_wise:
        return None
    return f"it mixes samples of the batch{': ' + op.why if op.why else ''}"


def divisibility_error(op: Op, strategy: str, axis: str, size: int) -> str | None:
    """Why `size` ranks cannot split this op this way (None if they can). Sequence divisibility depends on the
    run's sequence length and is checked by Plan.validate(seq=...)."""
    a = op.attrs
    if size == 1:
        return None
    if op.kind == G.ATTENTION and strategy in ("sp", "tp"):
        if a["n_heads"] % size:
            return f"mesh axis {axis}={size} does not divide n_heads={a['n_heads']}"
        if a["n_kv_heads"] % size and size % a["n_kv_heads"]:
            return (f"mesh axis {axis}={size} and n_kv_heads={a['n_kv_heads']} must divide one another "
                    f"(KV heads are split, or replicated when fewer than ranks)")
    if op.kind == G.MOE and strategy in ("ep", "ag_scatter") and a["n_experts"] % size:
        return f"mesh axis {axis}={size} does not divide n_experts={a['n_experts']}"
    if op.kind == G.MOE and strategy == "tp":
        if a["ffn_dim"] % size:
            return f"mesh axis {axis}={size} does not divide ffn_dim={a['ffn_dim']}"
        if a["shared_hidden"] % size:
            return f"mesh axis {axis}={size} does not divide the shared experts' hidden {a['shared_hidden']}"
    if op.kind == G.FFN and strategy == "tp" and a["hidden"] % size:
        return f"mesh axis {axis}={size} does not divide hidden={a['hidden']}"
    if op.kind == G.LINEAR and strategy == "tp" and a["in_features"] % size:
        return f"mesh axis {axis}={size} does not divide in_features={a['in_features']}"
    if op.kind == G.EMBEDDING and strategy == "vocab" and a["num_embeddings"] % size:
        return f"mesh axis {axis}={size} does not divide num_embeddings={a['num_embeddings']}"
    return None


def collective_names(op: Op, strategy: str) -> tuple[str, ...]:
    """Every collective of this op a plan can set a precision for: its inputs' reshardings (in0, in1, ...), the
    strategy's own, and the gradient reduction when it has parameters."""
    names = tuple(f"in{i}" for i in range(len(op.inputs)))
    names += STRATEGIES[op.kind][strategy].collectives if op.kind in STRATEGIES else ()
    return names + ((GRAD,) if op.params else ())


def allowed_precisions(collective: str) -> tuple[str, ...]:
    # Gradients are exchanged in at most BF16 (docs/reference.md, "Communication compression"): FP8 is for activations.
    return ("fp32", "bf16") if collective == GRAD else PRECISIONS


# ---- resharding between placements on one axis ----------------------------------------------------------
def transition(src: Placement, dst: Placement) -> str:
    """The collective that turns `src` into `dst` on one mesh axis (DTensor's redistribute rules)."""
    if src == dst:
        return "none"
    if isinstance(src, Shard) and isinstance(dst, Replicate):
        return "all_gather"
    if isinstance(src, Partial) and isinstance(dst, Shard):
        return "reduce_scatter"
    if isinstance(src, Partial) and isinstance(dst, Replicate):
        return "all_reduce"
    if isinstance(src, Shard) and isinstance(dst, Shard):
        return "all_to_all"
    if isinstance(src, Replicate) and isinstance(dst, Shard):
        return "slice"  # local, no communication
    raise ValueError(f"no resharding from {src} to {dst} (a value cannot become Partial)")

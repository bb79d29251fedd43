"""The checks every stage shares on (op, strategy) pairs: whether meshplan runs it exactly, the placements an op's
tensors can take, divisibility by the model axis, the collectives a plan may set a precision for, and the
resharding collective between two placements on one axis (DTensor's redistribute rules).
"""
from __future__ import annotations

import sympy

from .. import graph as G
from ..graph import Op
from ..placement import Partial, Placement, Replicate, Shard
from .base import GRAD, PRECISIONS, SEQ
from .registry import DEFAULT_STRATEGY, STRATEGIES


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
    strat = STRATEGIES.get(op.kind, {}).get(strategy)
    return None if strat is None else strat.divisibility_error(op, axis, size)


def collective_names(op: Op, strategy: str) -> tuple[str, ...]:
    """Every collective of this op a plan can set a precision for: its inputs' reshardings (in0, in1, ...), the
    strategy's own, and the gradient reduction when it has parameters."""
    names = tuple(f"in{i}" for i in range(len(op.inputs)))
    names += STRATEGIES[op.kind][strategy].precision_collectives(op) if op.kind in STRATEGIES else ()
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

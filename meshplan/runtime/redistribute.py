"""redistribute(tensor, src, dst): move a tensor between two placements on the mesh, one axis at a time.

Each step is the collective `ir.strategies.transition` names for that axis (S->R all_gather, P->S reduce_scatter,
P->R all_reduce, S(i)->S(j) all_to_all, R->S local slice), as an autograd Function whose backward follows the
gradient convention in collectives.py.

Layout: as in DTensor, a dimension sharded on several axes is split by the outer axis first (row-major over the
mesh). A per-axis collective on dimension d is only correct when no inner axis shards d at that moment (it
gathers or splits whole chunks of the axes outside it). `plan_steps` orders the axes so that every step is
correct; when no order of direct steps is (e.g. swapping the batch and sequence shards of two axes) it gathers
the innermost shards first and then applies the remaining transitions outermost first, which is always correct.
"""
from __future__ import annotations

from ..ir.placement import Partial, Placement, Replicate, Shard
from ..ir.strategies import transition
from .collectives import Channel, exchange, gather_shards, scatter_partial, sum_partial, take_shard
from .comm_stats import CommStats
from .process_groups import AxisGroup

Step = tuple[int, Placement, Placement]  # (axis index, from, to)


def normalize(placements, ndim: int) -> tuple[Placement, ...]:
    return tuple(Shard(p.dim % ndim) if isinstance(p, Shard) and ndim else p for p in placements)


def _inner_shard(cur, i: int, sizes, dim: int) -> bool:
    return any(isinstance(cur[j], Shard) and cur[j].dim == dim and sizes[j] > 1 for j in range(i + 1, len(cur)))


def _valid(cur, i: int, to: Placement, sizes) -> bool:
    frm = cur[i]
    kind = transition(frm, to)
    if kind == "all_reduce":
        return True
    if kind == "all_gather":
        return not _inner_shard(cur, i, sizes, frm.dim)
    if kind in ("slice", "reduce_scatter"):
        return not _inner_shard(cur, i, sizes, to.dim)
    if kind == "all_to_all":
        return not _inner_shard(cur, i, sizes, frm.dim) and not _inner_shard(cur, i, sizes, to.dim)
    raise AssertionError(kind)


_PRIORITY = {"all_gather": 0, "all_reduce": 0, "all_to_all": 1, "reduce_scatter": 1, "slice": 2}


def plan_steps(src, dst, sizes) -> list[Step]:
    """The per-axis transitions that turn placement `src` into `dst` (axes of size 1 are skipped). Steps that
    unshard go first (innermost first), slices last (outermost first): a slice taken early can block a gather."""
    n = len(sizes)
    for i in range(n):
        if sizes[i] > 1:
            transition(src[i], dst[i])  # raises for an impossible step (a value cannot become Partial)
    cur, steps = list(src), []
    while True:
        pending = [i for i in range(n) if sizes[i] > 1 and cur[i] != dst[i]]
        if not pending:
            return steps
        valid = [i for i in pending if _valid(cur, i, dst[i], sizes)]
        if not valid:
            return steps + _via_replicate(cur, dst, sizes)

        def order(i: int) -> tuple[int, int]:
            p = _PRIORITY[transition(cur[i], dst[i])]
            return p, (-i if p == 0 else i)

        i = min([(order(i), i) for i in valid])[1]  # not min(key=): dynamo cannot trace that (compile.py)
        steps.append((i, cur[i], dst[i]))
        cur[i] = dst[i]


def _via_replicate(cur, dst, sizes) -> list[Step]:
    """Gather every shard (innermost first), then apply what is left outermost first: always correct."""
    cur, steps = list(cur), []
    for i in reversed(range(len(sizes))):
        if sizes[i] > 1 and isinstance(cur[i], Shard):
            steps.append((i, cur[i], Replicate()))
            cur[i] = Replicate()
    for i in range(len(sizes)):
        if sizes[i] > 1 and cur[i] != dst[i]:
            assert _valid(cur, i, dst[i], sizes)
            steps.append((i, cur[i], dst[i]))
            cur[i] = dst[i]
    return steps


def redistribute(x, src, dst, axes: list[AxisGroup], *, op: str = "", tag: str = "", precision: str = "fp32",
                 stats: CommStats | None = None):
    """x held in placement `src` (one per mesh axis, in mesh order) -> the same tensor in placement `dst`."""
    src, dst = normalize(src, x.dim()), normalize(dst, x.dim())
    sizes = [g.size for g in axes]
    for p in (*src, *dst):
        if isinstance(p, Partial) and p.reduce_op != "sum":
            raise NotImplementedError(f"{op}: Partial({p.reduce_op}) is not supported by the runtime (only sum)")
    for i, frm, to in plan_steps(src, dst, sizes):
        g = axes[i]
        ch = Channel(g, op, tag, precision, stats)
        kind = transition(frm, to)
        if kind == "all_gather":
            x = gather_shards(x, frm.dim, ch)
        elif kind == "reduce_scatter":
            x = scatter_partial(x, to.dim, ch)
        elif kind == "all_reduce":
            x = sum_partial(x, ch)
        elif kind == "all_to_all":
            x = exchange(x, to.dim, frm.dim, ch)
        else:  # slice
            x = take_shard(x, to.dim, g.size, g.index)
    return x

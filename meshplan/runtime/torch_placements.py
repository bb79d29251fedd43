"""meshplan's placements <-> torch.distributed.tensor's, one for one.

The IR keeps its own placement classes (plan data for meshes of any size, no live world needed; ir/ imports no
torch.distributed); the runtime converts at the boundary to DTensor's. Both vocabularies are DTensor's: Shard(dim),
Replicate(), Partial(reduce_op) with reduce_op "sum" or "avg", printed alike ("S(1)", "R", "P(sum)"), so the
conversion is lossless both ways. A negative shard dim is normalised against the tensor's rank first (DTensor's
Shard wants a dim in range), which is why `to_torch` takes the rank.
"""
from __future__ import annotations

from torch.distributed.tensor import Partial as TPartial
from torch.distributed.tensor import Replicate as TReplicate
from torch.distributed.tensor import Shard as TShard
from torch.distributed.tensor.placement_types import Placement as TPlacement

from ..ir.placement import Partial, Placement, Replicate, Shard


def to_torch(p: Placement, ndim: int | None = None) -> TPlacement:
    if isinstance(p, Shard):
        if p.dim < 0 and ndim is None:
            raise ValueError(f"placement {p}: a negative shard dim needs the tensor's rank (ndim=)")
        return TShard(p.dim % ndim if p.dim < 0 else p.dim)
    if isinstance(p, Replicate):
        return TReplicate()
    if isinstance(p, Partial):
        return TPartial(p.reduce_op)
    raise TypeError(f"not a meshplan placement: {p!r}")


def from_torch(p: TPlacement) -> Placement:
    if isinstance(p, TShard):  # before Replicate: _StridedShard and friends subclass Shard
        if type(p) is not TShard:
            raise ValueError(f"placement {p}: {type(p).__name__} has no meshplan equivalent")
        return Shard(p.dim)
    if isinstance(p, TReplicate):
        return Replicate()
    if isinstance(p, TPartial):
        return Partial(p.reduce_op)
    raise ValueError(f"placement {p}: {type(p).__name__} has no meshplan equivalent")


def placements_to_torch(placements, ndim: int | None = None) -> tuple[TPlacement, ...]:
    """One per mesh axis, in mesh order (what DTensor's `placements` holds)."""
    return tuple(to_torch(p, ndim) for p in placements)


def placements_from_torch(placements) -> tuple[Placement, ...]:
    return tuple(from_torch(p) for p in placements)

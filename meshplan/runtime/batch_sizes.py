"""The global batch a rank's shard stands for, and whether a plan can split it: checked before a step runs."""
from __future__ import annotations

from ..ir import graph as G
from ..ir.graph import Graph, Op
from ..ir.placement import Placement, Shard
from ..ir.plan import Plan, PlanError


def check_sizes(plan: Plan, graph: Graph, ops: list[Op], buffers: dict, batch: int, seq: int) -> None:
    """Raise PlanError (one line naming the op) when the plan's shards do not divide this batch size or sequence
    length, or the sequence exceeds an attention op's RoPE table."""
    plan.validate(graph, batch=batch, seq=seq)
    sizes = {0: batch, 1: seq}
    for op in ops:
        if op.kind == G.ATTENTION:
            rope = buffers[op.name].get("rope_cos")
            if rope is not None and seq > rope.shape[0]:
                raise PlanError(f"sequence length {seq} exceeds {op.name}'s max_seq_len {rope.shape[0]}")
        if op.name not in plan.ops:
            continue
        p = plan.ops[op.name]
        for placements in (p.input, p.output):
            for dim, size in sizes.items():
                ways = 1
                for (axis, n), pl in zip(plan.mesh.axes, placements):
                    ways *= n if pl == Shard(dim) else 1
                if size % ways:
                    what = "batch size" if dim == 0 else "sequence length"
                    raise PlanError(f"plan.ops[{op.name!r}]: {ways} shards of dim {dim} do not divide the "
                                    f"{what} {size}")


def global_sizes(shape, placement: tuple[Placement, ...], axes) -> tuple[int, int]:
    """(B, S) of the global batch whose shard laid out as `placement` has `shape`."""
    sizes = list(shape)
    for g, p in zip(axes, placement):
        if isinstance(p, Shard) and p.dim in (0, 1):
            sizes[p.dim] *= g.size
    return sizes[0], sizes[1]

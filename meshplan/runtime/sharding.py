"""How each (op kind, strategy) lays its parameters out on its model axis: which dimension is split, or none.

A parameter is split on at most the op's model axis; on every other axis it is replicated. The gradient of a
replicated parameter is a Partial sum over the ranks that share it (they saw different tokens, or computed
redundantly from a Partial output gradient), which is exactly what `reduce_gradients` sums.
"""
from __future__ import annotations

from ..ir import graph as G
from ..ir.graph import Op
from ..ir.placement import Placement, Replicate, Shard

# (kind, strategy) -> {parameter name relative to the op's module: split dimension}
_SPLITS: dict[tuple[str, str], dict[str, int]] = {
    (G.ATTENTION, "tp"): {"wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "wo.weight": 1,
                          "wq.bias": 0, "wk.bias": 0, "wv.bias": 0,
                          "wq_b.weight": 0, "wkv_b.weight": 0},  # MLA (models/mla.py): heads' rows
    (G.MOE, "ep"): {"experts.w1": 0, "experts.w3": 0, "experts.w2": 0, "experts.w13": 0},
    (G.MOE, "ag_scatter"): {"experts.w1": 0, "experts.w3": 0, "experts.w2": 0, "experts.w13": 0},
    # Fused gate/up experts (experts.w13, [E, 2F, D]) stay whole under "tp": a contiguous split of dim 1 would
    # give one rank the gate rows and another the up rows. Each rank reads its F/n rows of both halves
    # (moe_routing.experts); the gradient's other rows are zero and the sum over the axis completes it.
    (G.MOE, "tp"): {"experts.w1": 1, "experts.w3": 1, "experts.w2": 2,
                    "shared.w1.weight": 0, "shared.w3.weight": 0, "shared.w2.weight": 1},
    (G.FFN, "tp"): {"w1.weight": 0, "w3.weight": 0, "w2.weight": 1},
    (G.LINEAR, "tp"): {"weight": 1},
    (G.EMBEDDING, "vocab"): {"weight": 0},
}

# the parameters an implementation reads by name: a registered module of that kind must have them (experts: w2,
# and w1/w3 or the fused w13, which moe_routing.experts checks)
REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    (G.ATTENTION, "tp"): ("wo.weight",),  # and wq/wk/wv, or MLA's latents (models/mla.py)
    (G.ATTENTION, "sp"): ("wo.weight",),
    (G.MOE, "ep"): ("gate.weight", "experts.w2"),
    (G.MOE, "ag_scatter"): ("gate.weight", "experts.w2"),
    (G.MOE, "tp"): ("gate.weight", "experts.w2"),
    (G.MOE, "seq"): ("gate.weight", "experts.w2"),
    (G.MOE, "replicate"): ("gate.weight", "experts.w2"),
    (G.FFN, "tp"): ("w1.weight", "w2.weight", "w3.weight"),
    (G.LINEAR, "tp"): ("weight",),
    (G.EMBEDDING, "vocab"): ("weight",),
}


def split_dim(op: Op, strategy: str, pname: str, n: int) -> int | None:
    """The dimension of parameter `pname` split over the op's model axis of size n (None: replicated)."""
    if n == 1:
        return None
    dim = _SPLITS.get((op.kind, strategy), {}).get(pname)
    if dim is not None and op.kind == G.ATTENTION and pname in ("wk.weight", "wv.weight", "wk.bias", "wv.bias") \
            and op.attrs["n_kv_heads"] % n:
        return None  # fewer KV heads than ranks: every rank keeps all of them and uses its own
    return dim


def param_placement(op: Op, strategy: str, axis: str | None, mesh_axes, pname: str) -> tuple[Placement, ...]:
    """One placement per mesh axis: Shard on the op's model axis when the strategy splits it, else Replicate."""
    out = []
    for name, size in mesh_axes:
        d = split_dim(op, strategy, pname, size) if name == axis else None
        out.append(Shard(d) if d is not None else Replicate())
    return tuple(out)

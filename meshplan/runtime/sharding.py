"""How each (op kind, strategy) lays its parameters out on its model axis, read from its Strategy object
(ir/strategies): which dimension is split, or none, and which parameters the implementation requires.

A parameter is split on at most the op's model axis; on every other axis it is replicated. The gradient of a
replicated parameter is a Partial sum over the ranks that share it (they saw different tokens, or computed
redundantly from a Partial output gradient), which is exactly what `reduce_gradients` sums.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..ir.graph import Op
from ..ir.placement import Placement, Replicate, Shard
from ..ir.strategies import STRATEGIES, strategy_of


class _Required(Mapping):
    """(kind, strategy) -> the parameters its implementation reads by name (Strategy.required): a registered
    module of that kind must have them (experts: w2, and w1/w3 or the fused w13, which moe_routing.experts
    checks). A view of the registry, so a pair registered later is seen too."""

    def __getitem__(self, key: tuple[str, str]) -> tuple[str, ...]:
        strat = strategy_of(*key)
        if strat is None or not strat.required:
            raise KeyError(key)
        return strat.required

    def __iter__(self):
        return iter([(k, n) for k, by_name in STRATEGIES.items() for n, s in by_name.items() if s.required])

    def __len__(self) -> int:
        return sum(1 for _ in self)


REQUIRED = _Required()


def split_dim(op: Op, strategy: str, pname: str, n: int) -> int | None:
    """The dimension of parameter `pname` split over the op's model axis of size n (None: replicated)."""
    strat = strategy_of(op.kind, strategy)
    return None if strat is None else strat.split_dim(op, pname, n)


def param_placement(op: Op, strategy: str, axis: str | None, mesh_axes, pname: str) -> tuple[Placement, ...]:
    """One placement per mesh axis: Shard on the op's model axis when the strategy splits it, else Replicate."""
    out = []
    for name, size in mesh_axes:
        d = split_dim(op, strategy, pname, size) if name == axis else None
        out.append(Shard(d) if d is not None else Replicate())
    return tuple(out)

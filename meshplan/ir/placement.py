"""Placements of a tensor along one mesh axis, in DTensor's vocabulary: Shard(dim), Replicate(), Partial(op).

A tensor's placement on a mesh is one Placement per mesh axis. The string forms ("S(1)", "R", "P(sum)") are what
plan YAML files use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Each rank holds a partial value; the full tensor is their reduction (sum or avg, as in DTensor)."""

    reduce_op: str = "sum"

    def __post_init__(self) -> None:
        if self.reduce_op not in ("sum", "avg"):
            raise ValueError(f"Partial.reduce_op: must be 'sum' or 'avg', got {self.reduce_op!r}")

    def __str__(self) -> str:
        return f"P({self.reduce_op})"


Placement = Shard | Replicate | Partial

_SHARD = re.compile(r"^S\((-?\d+)\)$")
_PARTIAL = re.compile(r"^P\((\w+)\)$")


def parse_placement(text: str) -> Placement:
    """Inverse of str(): 'S(1)' -> Shard(1), 'R' -> Replicate(), 'P(sum)' -> Partial('sum')."""
    t = str(text).strip()
    if t == "R":
        return Replicate()
    if m := _SHARD.match(t):
        return Shard(int(m.group(1)))
    if m := _PARTIAL.match(t):
        return Partial(m.group(1))
    raise ValueError(f"not a placement: {text!r} (expected 'S(dim)', 'R' or 'P(sum|avg)')")

"""Every (op kind, strategy) pair meshplan knows: one Strategy object each (base.py), grouped by op kind."""
from __future__ import annotations

from .. import graph as G
from .attention import ATTENTION
from .base import Strategy
from .dense import EMBEDDING, FFN, GENERIC, LINEAR, LM_HEAD, NORM
from .moe import MOE

STRATEGIES: dict[str, dict[str, Strategy]] = {
    G.ATTENTION: ATTENTION,
    G.MOE: MOE,
    G.FFN: FFN,
    G.EMBEDDING: EMBEDDING,
    G.NORM: NORM,
    G.LINEAR: LINEAR,
    G.LM_HEAD: LM_HEAD,
    G.GENERIC: GENERIC,
}

# What a plan that names no strategy gets: the Megatron-with-sequence-parallel default for each kind.
DEFAULT_STRATEGY = {G.ATTENTION: "tp", G.MOE: "ep", G.FFN: "tp", G.EMBEDDING: "seq", G.NORM: "seq",
                    G.LINEAR: "seq", G.LM_HEAD: "seq", G.GENERIC: "seq"}


def strategy_of(kind: str, name: str) -> Strategy | None:
    """The Strategy object of (kind, name); None for a pair meshplan does not know (data parallel, "dp", has no
    object: it splits no parameter and has no collective of its own)."""
    return STRATEGIES.get(kind, {}).get(name)

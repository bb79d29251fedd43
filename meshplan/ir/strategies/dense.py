"""The strategies of the dense kinds: FFN, linear, embedding, norm, LM head and generic (elementwise) ops.

FFN "tp": w1/w3 column-parallel, w2 row-parallel (Megatron), Partial output. Linear "tp": weight split on
in_features (row-parallel); a bias stays whole and is added on one rank. Embedding "vocab": table rows split, rows
a rank lacks contribute zeros to a Partial sum; with sequence-sharded ids it first all-gathers them (int64).
"""
from __future__ import annotations

from ..graph import B, Op, S
from ..placement import Partial, Replicate
from .base import COMPUTE, IDS, IO, SEQ, TP_IO, PhaseSpec, Strategy, replicate, seq


def vocab_phases(op: Op, io: IO) -> tuple[PhaseSpec, ...]:
    if io[0] != SEQ:
        return (PhaseSpec(COMPUTE),)
    return (PhaseSpec(IDS, "all_gather", B * S, B * S, dtype="int64"), PhaseSpec(COMPUTE, after=(IDS,)))


FFN = {
    "tp": Strategy("tp", TP_IO, "ffn", "w1/w3 column-parallel, w2 row-parallel",
                   params={"w1.weight": 0, "w3.weight": 0, "w2.weight": 1},
                   required=("w1.weight", "w2.weight", "w3.weight"), divides=(("hidden", "hidden={v}"),)),
    "seq": seq(),
    "replicate": replicate(),
}
LINEAR = {
    "tp": Strategy("tp", TP_IO, "ffn", "weight split on in_features: row-parallel", params={"weight": 1},
                   required=("weight",), divides=(("in_features", "in_features={v}"),)),
    "seq": seq(),
    "replicate": replicate(),
}
EMBEDDING = {
    "seq": seq("token ids sequence-sharded, table replicated"),
    "vocab": Strategy("vocab", ((SEQ, Partial()), (Replicate(), Partial())), "vocab",
                      "table rows split; rows a rank lacks contribute zeros to a partial sum", params={"weight": 0},
                      required=("weight",), divides=(("num_embeddings", "num_embeddings={v}"),), phases=vocab_phases),
    "replicate": replicate(),
}
NORM = {"seq": seq(), "replicate": replicate()}
LM_HEAD = {"seq": seq(), "replicate": replicate()}
# Generic ops are elementwise or unknown: sequence-sharded only where every input and the output agree.
GENERIC = {"seq": seq(), "replicate": replicate()}

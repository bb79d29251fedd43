"""Attention's strategies: Ulysses sequence parallelism, Megatron tensor parallelism, replication.

Ulysses ("sp", docs/reference.md, "Communication volumes"): q, k, v are projected on this rank's S/n tokens, an
all-to-all turns them from sequence- to head-sharded ([b, s/n, h(1+2/m)] -> [b, s, h(1+2/m)/n]; KV heads fewer
than ranks are repeated to n first), attention runs on all tokens of hq/n heads, and a second all-to-all turns the
output back ([b, s, h/n] -> [b, s/n, h]) before the output projection.
Megatron TP ("tp"): heads split, wq/wk/wv (and MLA's wq_b, wkv_b) column-parallel, wo row-parallel, output a
Partial sum; the all-gather before and reduce-scatter after are the graph's edge reshardings.
"""
from __future__ import annotations

import sympy

from ..graph import B, N, Op, S
from .base import CORE, IO, OUT_A2A, OUT_PROJ, QKV, QKV_A2A, SEQ_IO, TP_IO, PhaseSpec, Strategy, replicate

_HEADS = (("n_heads", "n_heads={v}"),)
_KV = frozenset({"wk.weight", "wv.weight", "wk.bias", "wv.bias"})


def ulysses_phases(op: Op, io: IO) -> tuple[PhaseSpec, ...]:
    t, a = B * S, op.attrs
    q, kv = a["n_heads"] * a["head_dim"], 2 * a["n_kv_heads"] * a["head_dim"]
    kv_sent = kv * N / sympy.Min(N, a["n_kv_heads"])  # KV heads repeated up to n when fewer than ranks
    # per rank: 1/n of the replica's work (S/n tokens in the projections, hq/n heads in the core)
    d, qkv_w, out_w = a["dim"], a["dim"] * (q + kv), q * a["dim"]
    qkv_f, out_f = 2 * t * qkv_w, 2 * t * out_w
    qkv_el, out_el = t * qkv_w / d, t * out_w / d  # q, k, v and the attention output, elements
    return (
        PhaseSpec(QKV, flops=qkv_f / N, act=(t * d + qkv_el) / N, weights=qkv_w, gemm=(t / N, d, qkv_w / d)),
        PhaseSpec(QKV_A2A, "all_to_all", t * (q + kv_sent), 3 * t, after=(QKV,)),
        # the causal S^2 products: whatever ops.py counts beyond the projections
        PhaseSpec(CORE, after=(QKV_A2A,), flops=(op.flops - qkv_f - out_f) / N, act=(qkv_el + out_el) / N),
        PhaseSpec(OUT_A2A, "all_to_all", t * q, t, after=(CORE,)),
        PhaseSpec(OUT_PROJ, after=(OUT_A2A,), flops=out_f / N, act=(out_el + t * d) / N, weights=out_w,
                  gemm=(t / N, out_w / d, d)),
    )


ATTENTION = {
    "sp": Strategy("sp", SEQ_IO, "sequence",
                   "Ulysses: all-to-all q/k/v from sequence- to head-sharded, attention, all-to-all back",
                   required=("wo.weight",), divides=_HEADS, splits_kv_heads=True, phases=ulysses_phases,
                   chunked=True),
    "tp": Strategy("tp", TP_IO, "heads", "Megatron TP: heads split, wq/wk/wv column- and wo row-parallel",
                   params={"wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "wo.weight": 1,
                           "wq.bias": 0, "wk.bias": 0, "wv.bias": 0,
                           "wq_b.weight": 0, "wkv_b.weight": 0},  # MLA (models/mla.py): the heads' rows
                   kv_params=_KV, splits_kv_heads=True,
                   required=("wo.weight",),  # and wq/wk/wv, or MLA's latents (models/mla.py)
                   divides=_HEADS),
    "replicate": replicate(),
}

"""MoE's strategies: expert parallelism, tensor parallelism, all-gather + local scatter, sequence, replication.

Expert parallel ("ep"): route this rank's S/n tokens, all-to-all dispatch of each token's k copies to the ranks
holding their experts, local experts, all-to-all combine back, weighted sum (V_EP, docs/reference.md,
"Communication volumes"). Before the dispatch the ranks swap per-expert row counts (COUNTS: n_experts integers).
Shared experts (replicated) run on local tokens beside the all-to-alls.
TP ("tp"): every expert's hidden dimension split (w1/w3 column, w2 row, shared experts likewise); a fused gate/up
`experts.w13` ([E, 2F, D]) stays whole, since a contiguous split of dim 1 would give one rank the gate rows and
another the up rows: each rank reads its F/n rows of both halves (runtime/moe_routing.experts).
"ag_scatter" (the adjusted pattern for large top-k): tokens all-gathered on the edge in, each rank scatters the
assignments of its own experts locally, Partial sum out; shared experts whole, run on 1/n of the tokens per rank.
"""
from __future__ import annotations

import sympy

from ..graph import B, N, Op, S
from .base import (
    COMBINE,
    COUNTS,
    DISPATCH,
    EXPERTS,
    IO,
    ROUTE,
    SEQ_IO,
    SHARED,
    TP_IO,
    UNPERMUTE,
    PhaseSpec,
    Strategy,
    replicate,
    seq,
)

_REQUIRED = ("gate.weight", "experts.w2")  # and w1/w3 or the fused w13, which moe_routing.experts checks
_EXPERTS = {"experts.w1": 0, "experts.w3": 0, "experts.w2": 0, "experts.w13": 0}
_N_EXPERTS = (("n_experts", "n_experts={v}"),)


def expert_parallel_counts(op: Op, io: IO) -> tuple[PhaseSpec, ...]:
    """Inside route: every rank sends each other rank its row count per expert there (n_experts int64 per rank,
    so the group's tensor is n·n_experts)."""
    return (PhaseSpec(COUNTS, "all_to_all", N * op.attrs["n_experts"], N, dtype="int64"),)


def expert_parallel_phases(op: Op, io: IO) -> tuple[PhaseSpec, ...]:
    t, a = B * S, op.attrs
    d, k, e, f, sh = a["dim"], a["top_k"], a["n_experts"], a["ffn_dim"], a["shared_hidden"]
    routed = k * t  # each token's k copies
    phases = (
        # router GEMM on this rank's T/n tokens, then a copy of each token per chosen expert (memory-bound)
        PhaseSpec(ROUTE, flops=2 * t * d * e / N, act=t * d * (1 + k) / N, weights=d * e, gemm=(t / N, d, e)),
        PhaseSpec(DISPATCH, "all_to_all", routed * d, routed, after=(ROUTE,), routed=True),
        # e/n local experts; rows per expert: the group's k·T routed rows over e experts (uniform routing)
        PhaseSpec(EXPERTS, after=(DISPATCH,), flops=6 * k * t * d * f / N, act=2 * k * t * d / N,
                  weights=e / N * 3 * d * f, gemm=(k * t / e, d, f)),
        PhaseSpec(COMBINE, "all_to_all", routed * d, routed, after=(EXPERTS,), routed=True),
    )
    # the weighted sum of each token's k expert outputs (+ shared): elementwise, memory traffic only
    unpermute = dict(flops=sympy.Integer(0), act=t * d * (k + 2) / N)
    if sh:  # needs only the op's input: fills the compute stream while the all-to-alls run
        shared = PhaseSpec(SHARED, flops=6 * t * d * sh / N, act=2 * t * d / N, weights=3 * d * sh,
                           gemm=(t / N, d, sh))
        return phases + (shared, PhaseSpec(UNPERMUTE, after=(COMBINE, SHARED), **unpermute))
    return phases + (PhaseSpec(UNPERMUTE, after=(COMBINE,), **unpermute),)


MOE = {
    "ep": Strategy("ep", SEQ_IO, "experts",
                   "expert parallel: all-to-all dispatch of routed tokens, local experts, all-to-all combine",
                   params=_EXPERTS, required=_REQUIRED, divides=_N_EXPERTS, phases=expert_parallel_phases,
                   inline=expert_parallel_counts, chunked=True),
    "tp": Strategy("tp", TP_IO, "ffn", "every expert's hidden dimension split (w1/w3 column, w2 row)",
                   params={"experts.w1": 1, "experts.w3": 1, "experts.w2": 2,
                           "shared.w1.weight": 0, "shared.w3.weight": 0, "shared.w2.weight": 1},
                   required=_REQUIRED,
                   divides=(("ffn_dim", "ffn_dim={v}"), ("shared_hidden", "the shared experts' hidden {v}"))),
    "ag_scatter": Strategy("ag_scatter", TP_IO, "experts",
                           "all-gather tokens, local scatter to this rank's experts, partial sum to reduce-scatter",
                           params=_EXPERTS, required=_REQUIRED, divides=_N_EXPERTS),
    "seq": seq("every rank holds all experts and routes its own tokens", required=_REQUIRED),
    "replicate": replicate(required=_REQUIRED),
}

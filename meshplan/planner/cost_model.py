"""Symbolic cost of one op under one strategy on a model axis of size n: FLOPs and HBM traffic per GPU, the
op's own collectives, its placements, and the resharding collectives on its input edges.

Everything is a sympy expression over B (micro-batch per data-parallel replica), S (sequence) and n, evaluated
once per mesh through sympy.lambdify (see problem.py). Conventions:
  * Training = forward + backward = 3x forward FLOPs; every forward collective has a backward twin of the same
    volume (the all-to-alls run again in reverse; reshardings run the collective transition() names for the
    gradient placements, e.g. all-gather forward -> reduce-scatter backward).
  * Compute time = 3·FLOPs / (peak · gemm_efficiency · size efficiency) + 3·HBM bytes / HBM bandwidth. Size
    efficiency is prod(x / (x + c)) over the op's main GEMM dims (c = cluster.gemm_half_size): narrow GEMMs
    (TP's split expert hidden, few tokens per expert) run slower. Elementwise ops count HBM bytes only.
  * Collective volumes follow collectives_cost.py (bytes each GPU sends); REFERENCE.md per-layer volumes:
      TP attention / MoE:  all-gather + reduce-scatter of X = b·s·h on the edges  -> V_TP = 2·b·s·h·(n-1)/n
      SP attention:  qkv all-to-all of X = b·s·h(1+2/m), out all-to-all of X = b·s·h:
                     sent = b·s·h·(2+2/m)·(n-1)/n² = half of REFERENCE Eq. 2 (which counts send and receive)
      EP MoE:        dispatch and combine all-to-all of X = k·b·s·h -> V_EP = 2·(k/n)·b·s·h·(n-1)/n
      AG-scatter:    the adjusted pattern; all-gather + reduce-scatter on the edges, V_TP whatever k is.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir import graph as G
from ..ir.graph import Op
from ..ir.placement import Partial, Placement, Replicate, Shard
from ..ir.strategies import (
    DEFAULT_STRATEGY, STRATEGIES, batch_parallel_error, divisibility_error, layout_error, native_io, offered_error,
    transition,
)
from . import memory
from .memory import DP, N, SEQ_LIKE

BATCH = Shard(0)


@dataclass(frozen=True)
class Coll:
    """One op-internal collective: kind, logical tensor size X in elements, token rows (fp8 scales)."""
    name: str
    kind: str
    elems: sympy.Expr
    rows: sympy.Expr


@dataclass
class OpTerms:
    """One strategy of one op, symbolic in B, S, n."""
    op: Op
    cand: str
    input: Placement  # on the model axis
    output: Placement
    flops: sympy.Expr  # forward FLOPs on one GPU
    hbm_bytes: sympy.Expr  # forward bytes read + written on one GPU by memory-bound (elementwise) work
    gemm_dims: tuple  # main GEMM's dims on one GPU, for the size efficiency
    colls: tuple[Coll, ...]
    params_split: sympy.Expr
    params_replicated: sympy.Expr
    activations: sympy.Expr  # bytes saved for backward per micro-batch
    checkpoint: sympy.Expr  # bytes kept per micro-batch under full recomputation (the op's inputs)


def candidates(op: Op, n: int, b: int, seq: int) -> list[str]:
    """Strategies this op can take on an n-way model axis (micro-batch b per replica, sequence seq)."""
    if op.kind not in STRATEGIES:
        return []
    if n == 1:
        return [DEFAULT_STRATEGY[op.kind]]  # all strategies coincide; keep the plan readable
    out = []
    for s in STRATEGIES[op.kind]:
        if divisibility_error(op, s, "mp", n) is not None:
            continue
        i, o = native_io(op, s)
        if any(isinstance(p, Shard) and p.dim == 1 for p in (i, o)) and seq % n:
            continue
        if offered_error(op, s) is not None:  # the runtime would not compute this op exactly (ir/strategies)
            continue
        out.append(s)
    if b % n == 0 and _batch_shardable(op):
        out.append(DP)
    return out


def _batch_shardable(op: Op) -> bool:
    """Data parallel on the model axis: batch-wise, and every tensor it reshards has a batch dim to split."""
    metas = [m for i, m in enumerate(op.input_metas) if i not in op.param_inputs] + [op.output]
    return batch_parallel_error(op) is None and all(layout_error(m, BATCH) is None for m in metas)


def placements(op: Op, cand: str) -> tuple[Placement, Placement]:
    if cand == DP:
        return BATCH, BATCH
    return native_io(op, cand)


def grad_placements(op: Op, cand: str) -> tuple[Placement, Placement]:
    """Placements of the gradients flowing back: a replicated input used by a sharded computation (TP's R -> P)
    gets partial gradients; the gradient of a partial output is replicated."""
    i, o = placements(op, cand)
    gi = Partial() if isinstance(i, Replicate) and isinstance(o, Partial) else i
    go = Replicate() if isinstance(o, Partial) else o
    return gi, go


def edge_kinds(src: Op, s: str, dst: Op, t: str) -> tuple[str, str]:
    """(forward, backward) collective on the model axis for the edge src -> dst under strategies s, t."""
    fwd = transition(placements(src, s)[1], placements(dst, t)[0])
    bwd = transition(grad_placements(dst, t)[0], grad_placements(src, s)[1])
    return fwd, bwd


def terms(op: Op, cand: str) -> OpTerms:
    t = G.B * G.S
    a = op.attrs
    sharded_in = cand in SEQ_LIKE
    zero = sympy.Integer(0)
    flops, hbm, dims, colls = op.flops, zero, (), ()
    whole = cand == "replicate"
    if op.kind == G.ATTENTION:
        hq, hkv, hd, d = a["n_heads"], a["n_kv_heads"], a["head_dim"], a["dim"]
        q, kv = hq * hd, 2 * hkv * hd
        proj_kv = 2 * t * d * kv
        rest = op.flops - proj_kv  # q/o projections and the causal core split by heads or tokens
        kvs = sympy.Min(N, hkv)
        if whole:
            flops, dims = op.flops, (t, d, q)
        elif cand == "tp":  # KV projection split over min(n, n_kv) ranks, recomputed beyond
            flops, dims = rest / N + proj_kv / kvs, (t, d, q / N)
        else:  # sp, dp: every FLOP divided n ways
            flops, dims = op.flops / N, (t / N, d, q)
        if cand == "sp":
            colls = (Coll("qkv_a2a", "all_to_all", t * (q + kv * N / kvs), 3 * t),
                     Coll("out_a2a", "all_to_all", t * q, t))
    elif op.kind == G.MOE:
        d, f, e, k, sh = a["dim"], a["ffn_dim"], a["n_experts"], a["top_k"], a["shared_hidden"]
        router, experts, shared = 2 * t * d * e, 6 * k * t * d * f, 6 * t * d * sh
        per_expert = k * t / e  # tokens one expert sees across the group
        if whole:
            flops, dims = op.flops, (per_expert, d, f)
        elif cand in ("ep", "seq", DP):
            flops = op.flops / N
            dims = (per_expert, d, f) if cand == "ep" else (per_expert / N, d, f)
        elif cand == "tp":
            flops, dims = router + (experts + shared) / N, (per_expert, d, f / N)
        else:  # ag_scatter: router on all gathered tokens, local experts at full width
            flops, dims = router + (experts + shared) / N, (per_expert, d, f)
        if cand == "ep":
            colls = (Coll("dispatch", "all_to_all", k * t * d, k * t), Coll("combine", "all_to_all", k * t * d, k * t))
    elif op.kind == G.FFN:
        d, h = a["dim"], a["hidden"]
        flops = op.flops if whole else op.flops / N
        dims = (t, d, h / N) if cand == "tp" else (t if whole else t / N, d, h)
    elif op.kind in (G.LINEAR, G.LM_HEAD):
        flops = op.flops if whole else op.flops / N
        dims = (t, a["in_features"] / N, a["out_features"]) if cand == "tp" else \
            (t if whole else t / N, a["in_features"], a["out_features"])
    else:  # embedding, norm, generic: memory-bound, bytes in + out
        elems = sum((m.numel for m in op.input_metas if m.dtype.startswith("float")), zero)
        elems += op.output.numel if op.output is not None else 0
        hbm = memory.ACT_BYTES * elems / (N if sharded_in or cand == "vocab" else 1)
        flops = zero if op.kind == G.EMBEDDING else (op.flops if whole else op.flops / N)
    i, o = placements(op, cand)
    split, rep = memory.param_split(op, cand)
    return OpTerms(op, cand, i, o, sympy.sympify(flops), sympy.sympify(hbm), tuple(sympy.sympify(x) for x in dims),
                   colls, split, rep, memory.activation_bytes(op, cand),
                   memory.checkpoint_bytes(op, isinstance(i, Shard)))


def size_efficiency(dims, c: float):
    """prod over GEMM dims of x / (x + c): tile and wave quantisation of narrow GEMMs."""
    eff = sympy.Integer(1)
    for x in dims:
        eff = eff * x / (x + c)
    return eff


def compute_time(flops: float, hbm_bytes: float, dims, cluster) -> float:
    """compute_time_expr evaluated: seconds of forward + backward on one GPU per micro-batch."""
    if dims:
        eff = 1.0
        for x in dims:
            eff *= x / (x + cluster.gemm_half_size)
        gemm = 3 * flops / (cluster.achievable_flops * eff)
    else:
        gemm = 3 * flops / cluster.peak_flops
    return gemm + 3 * hbm_bytes / cluster.hbm_bandwidth


def compute_time_expr(tm: OpTerms, cluster) -> sympy.Expr:
    """Seconds of forward + backward compute per micro-batch on one GPU (symbolic in B, S, n)."""
    gemm = 3 * tm.flops / (cluster.achievable_flops * size_efficiency(tm.gemm_dims, cluster.gemm_half_size)) \
        if tm.gemm_dims else 3 * tm.flops / cluster.peak_flops
    return gemm + 3 * tm.hbm_bytes / cluster.hbm_bandwidth

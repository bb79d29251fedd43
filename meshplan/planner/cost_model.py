"""Symbolic cost of one op under one strategy on a model axis of size n: FLOPs and HBM traffic per GPU, the
op's own collectives, its placements, and the resharding collectives on its input edges.

Everything is a sympy expression over B (micro-batch per data-parallel replica), S (sequence) and n, evaluated
once per mesh through sympy.lambdify (see problem.py). Conventions:
  * Training = forward + backward = 3x forward FLOPs; every forward collective has a backward twin of the same
    volume (the all-to-alls run again in reverse; reshardings run the collective transition() names for the
    gradient placements, e.g. all-gather forward -> reduce-scatter backward).
  * Compute time, on a GPU cluster with a kernel model (kernels.py, docs/reference.md#kernels): every GEMM in
    waves of tiles on the SMs (forward, input and weight gradient), FlashAttention at its own forward/backward
    efficiency, memory-bound kernels (permute/unpermute, SwiGLU, router softmax/top-k, RoPE, norms) as 3x their
    forward HBM bytes, a fixed cost per kernel launch; EP experts run the most loaded rank's rows (ep_imbalance).
    Without a kernel model (CPU clusters): 3·FLOPs / (peak · gemm_efficiency · size efficiency) + 3·HBM bytes /
    HBM bandwidth, size efficiency prod(x / (x + c)) over the op's main GEMM dims (c = cluster.gemm_half_size).
  * Collective volumes follow collectives_cost.py (bytes each GPU sends); docs/reference.md per-layer volumes:
      TP attention / MoE:  all-gather + reduce-scatter of X = b·s·h on the edges  -> V_TP = 2·b·s·h·(n-1)/n
      SP attention:  qkv all-to-all of X = b·s·h(1+2/m), out all-to-all of X = b·s·h:
                     sent = b·s·h·(2+2/m)·(n-1)/n² = half of REFERENCE Eq. 2 (which counts send and receive)
      EP MoE:        dispatch and combine all-to-all of X = k·b·s·h -> V_EP = 2·(k/n)·b·s·h·(n-1)/n
      AG-scatter:    the adjusted pattern; all-gather + reduce-scatter on the edges, V_TP whatever k is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir import graph as G
from ..ir.graph import Op
from ..ir.placement import Partial, Placement, Replicate, Shard
from ..ir.strategies import (
    STRATEGIES,
    batch_parallel_error,
    default_strategy,
    divisibility_error,
    layout_error,
    native_io,
    offered_error,
    strategy_of,
    transition,
)
from . import kernels, memory
from .memory import DP, N, no_terms, shape

BATCH = Shard(0)


@dataclass(frozen=True)
class Coll:
    """One op-internal collective: kind, logical tensor size X in elements, token rows (fp8 scales)."""
    name: str
    kind: str
    elems: sympy.Expr
    rows: sympy.Expr
    routed: bool = False  # the strategy's token-routed exchange (PhaseSpec.routed): imbalance and DeepEP apply
    # The compute beside it in a chunked schedule (planner/overlap.py): the strategy's compute phases it waits for
    # (before) and that wait for it (after), as (FLOPs, elements read and written) per rank and forward, and the
    # same over all the strategy's compute phases (whole): shares of the op's compute time. Zero: no such phases.
    before: tuple = (sympy.Integer(0), sympy.Integer(0))
    after: tuple = (sympy.Integer(0), sympy.Integer(0))
    whole: tuple = (sympy.Integer(0), sympy.Integer(0))


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
    # kernel-level view (kernels.py): attention core FLOPs, forward launches, then (count, m, k, n, ragged) per GEMM
    kernel: tuple = ()


def candidates(op: Op, n: int, b: int, seq: int) -> list[str]:
    """Strategies this op can take on an n-way model axis (micro-batch b per replica, sequence seq)."""
    if op.kind not in STRATEGIES:
        return []
    if n == 1:  # all strategies coincide in layout; keep the plan readable, and the default only where it is exact
        return [default_strategy(op, sharded=False)]
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


def ep_imbalance(k, t, experts_split: bool):
    """max/mean routed rows over the n ranks that split the experts (docs/reference.md#router-imbalance): with a
    router that spreads tokens evenly in expectation (random weights, or a trained router with a balancing loss)
    each rank's load is a sum of k·t/n expected rows with binomial spread, and the most loaded of n such ranks sits
    sqrt(2 ln n) standard deviations above the mean. Measured against the reference router by
    benchmarks/router_imbalance.py. TP, which gives every rank a slice of every expert, pays no imbalance."""
    if not experts_split:
        return sympy.Integer(1)
    return 1 + sympy.sqrt(2 * sympy.log(N) * (N - 1) / (k * t))


def imbalance_factor(k: int, t: float, n: int) -> float:
    """ep_imbalance at numbers (n ranks, t tokens of the group, top-k): what the most loaded rank receives over
    the mean, which sets EP's all-to-all time as it sets its expert GEMMs'."""
    return 1 + math.sqrt(2 * math.log(n) * (n - 1) / (k * t)) if n > 1 else 1.0


def collectives(op: Op, cand: str, io) -> tuple[Coll, ...]:
    """The op's own collectives under `cand`: the strategy's communication phases (ir/strategies) whose wire
    precision the plan chooses. A phase with a fixed dtype (vocab-parallel embedding's int64 token ids, when its
    input is sequence-sharded) is not priced here: its bytes are the strategy's, but pricing has no fixed-dtype
    collective yet."""
    strat = strategy_of(op.kind, cand)
    if strat is None:
        return ()
    specs = strat.phases(op, io)
    computes = [p for p in specs if not p.comm and p.flops is not None]
    work = lambda ps: (sum((p.flops for p in ps), sympy.Integer(0)),  # noqa: E731
                       sum((p.act + p.weights for p in ps), sympy.Integer(0)))
    return tuple(Coll(p.name, p.collective, p.elements, p.rows, p.routed,
                      work([c for c in computes if c.name in p.after]),
                      work([c for c in computes if p.name in c.after]), work(computes))
                 for p in specs if p.comm and p.dtype is None)


def _attention(op: Op, cand: str, whole: bool):
    """(flops, core flops, hbm bytes, gemms, dims, launches) of the attention op on one GPU."""
    t, a = G.B * G.S, op.attrs
    hq, hkv, hd, d = a["n_heads"], a["n_kv_heads"], a["head_dim"], a["dim"]
    q, kv = hq * hd, 2 * hkv * hd
    proj_kv = 2 * t * d * kv
    core = 2 * G.B * G.S * G.S * hq * hd  # ops.py: causal QK^T and AV
    rest = op.flops - proj_kv  # q/o projections and the causal core split by heads or tokens
    kvs = sympy.Min(N, hkv)
    split, sharded = shape(op, cand)
    if whole:
        flops, dims, share = op.flops, (t, d, q), 1
        gemms = ((1, t, d, q + kv, 0), (1, t, q, d, 0))
        rope = t * (q + kv / 2)
    elif split == "heads":  # tp: KV projection split over min(n, n_kv) ranks, recomputed beyond
        flops, dims, share = rest / N + proj_kv / kvs, (t, d, q / N), 1 / N
        gemms = ((1, t, d, q / N + kv / kvs, 0), (1, t, q / N, d, 0))
        rope = t * (q / N + kv / 2 / kvs)
    elif sharded:  # sp, dp: every FLOP divided n ways (sp: projections on t/n tokens, core on all tokens of hq/n
        # heads)
        flops, dims, share = op.flops / N, (t / N, d, q), 1 / N
        gemms = ((1, t / N, d, q + kv, 0), (1, t / N, q, d, 0))
        rope = t / N * (q + kv / 2)
    else:
        raise no_terms(op, cand)
    hbm = 2 * memory.ACT_BYTES * rope  # RoPE reads and writes q and k
    return flops, core * share, hbm, gemms, dims, 6


def _moe(op: Op, cand: str, whole: bool, balanced: bool = False):
    """(flops, core flops, hbm bytes, gemms, dims, launches) of the MoE FFN on one GPU. Tokens are routed
    on t_r rows here (all of them under TP and ag_scatter, whose routers run on gathered tokens: Megatron's
    all-gather dispatcher permutes every routed token on every TP rank); the local experts see `rows` rows each,
    the most loaded rank's share when experts are split over ranks."""
    t, a = G.B * G.S, op.attrs
    d, f, e, k, sh = a["dim"], a["ffn_dim"], a["n_experts"], a["top_k"], a["shared_hidden"]
    router, experts, shared = 2 * t * d * e, 6 * k * t * d * f, 6 * t * d * sh
    per_expert = k * t / e  # tokens one expert sees across the group
    local, width, t_r, t_sh, sh_w = e, f, t, t, sh
    split, sharded = shape(op, cand)
    if whole:
        flops, dims, rows = op.flops, (per_expert, d, f), per_expert
    elif sharded:  # ep, seq, dp
        flops = op.flops / N
        dims = (per_expert, d, f) if split == "experts" else (per_expert / N, d, f)
        t_r = t_sh = t / N
        if split == "experts":
            local, rows = e / N, per_expert * ep_imbalance(k, t, not balanced)
        else:
            rows = per_expert / N
    elif split == "ffn":  # tp
        flops, dims, rows = router + (experts + shared) / N, (per_expert, d, f / N), per_expert
        width, sh_w = f / N, sh / N
    elif split == "experts":  # ag_scatter: router on all gathered tokens, local experts at full width
        flops, dims = router + (experts + shared) / N, (per_expert, d, f)
        local, rows, sh_w = e / N, per_expert * ep_imbalance(k, t, not balanced), sh / N
    else:
        raise no_terms(op, cand)
    gemms = ((1, t_r, d, e, 0), (local, rows, d, 2 * width, 1), (local, rows, width, d, 1))  # experts: ragged rows
    if sh:
        gemms += ((1, t_sh, d, 2 * sh_w, 0), (1, t_sh, sh_w, d, 0))
    routed = local * rows  # rows through this rank's experts
    act = memory.ACT_BYTES
    hbm = (3 * memory.FP32 * t_r * e  # router softmax + top-k: logits read, probabilities written and read
           + act * 2 * k * t_r * d  # permute: read and write every routed copy
           + act * (k * t_r * d + t_r * d)  # unpermute: read the copies, write the weighted sum
           + act * 3 * routed * width  # SwiGLU: read gate and up, write their product
           + (act * 3 * t_sh * sh_w if sh else 0))
    return flops, 0, hbm, gemms, dims, 8 + (3 if sh else 0)


# what the model axis may split, per op kind, in the compute and activation terms below (memory.shape)
_COMMON = ("none", "batch")
_PRICED_SPLITS = {G.ATTENTION: ("heads", "sequence") + _COMMON, G.MOE: ("experts", "ffn") + _COMMON,
                  G.FFN: ("ffn",) + _COMMON, G.LINEAR: ("ffn",) + _COMMON, G.LM_HEAD: _COMMON,
                  G.EMBEDDING: ("vocab",) + _COMMON, G.NORM: _COMMON, G.GENERIC: _COMMON}


def terms(op: Op, cand: str, balanced: bool = False) -> OpTerms:
    """balanced: the run forces an even token distribution over experts (benchmarks do): no EP imbalance."""
    t = G.B * G.S
    a = op.attrs
    split, sharded_in = memory.shape(op, cand)
    if split not in _PRICED_SPLITS.get(op.kind, ()):
        raise no_terms(op, cand)
    zero = sympy.Integer(0)
    flops, hbm, dims, core, gemms, launches = op.flops, zero, (), zero, (), 1
    whole = split == "none" and not sharded_in  # every rank computes the whole op
    if op.kind == G.ATTENTION:
        flops, core, hbm, gemms, dims, launches = _attention(op, cand, whole)
    elif op.kind == G.MOE:
        flops, core, hbm, gemms, dims, launches = _moe(op, cand, whole, balanced)
    elif op.kind == G.FFN:
        d, h = a["dim"], a["hidden"]
        flops = op.flops if whole else op.flops / N
        dims = (t, d, h / N) if split == "ffn" else (t if whole else t / N, d, h)
        rows, width = dims[0], dims[2]
        gemms = ((1, rows, d, 2 * width, 0), (1, rows, width, d, 0))
        hbm, launches = memory.ACT_BYTES * 3 * rows * width, 3  # SwiGLU
    elif op.kind in (G.LINEAR, G.LM_HEAD):
        flops = op.flops if whole else op.flops / N
        dims = (t, a["in_features"] / N, a["out_features"]) if split == "ffn" else \
            (t if whole else t / N, a["in_features"], a["out_features"])
        gemms = ((1,) + dims + (0,),)
    else:  # embedding, norm, generic: memory-bound, bytes in + out
        elems = sum((m.numel for m in op.input_metas if m.dtype.startswith("float")), zero)
        elems += op.output.numel if op.output is not None else 0
        hbm = memory.ACT_BYTES * elems / (N if sharded_in or split == "vocab" else 1)
        flops = zero if op.kind == G.EMBEDDING else (op.flops if whole else op.flops / N)
    i, o = placements(op, cand)
    colls = collectives(op, cand, (i, o))
    split, rep = memory.param_split(op, cand)
    kernel = (sympy.sympify(core), sympy.Integer(launches)) + tuple(sympy.sympify(x) for g in gemms for x in g)
    return OpTerms(op, cand, i, o, sympy.sympify(flops), sympy.sympify(hbm), tuple(sympy.sympify(x) for x in dims),
                   colls, split, rep, memory.activation_bytes(op, cand),
                   memory.checkpoint_bytes(op, isinstance(i, Shard)), kernel)


def size_efficiency(dims, c: float):
    """prod over GEMM dims of x / (x + c): tile and wave quantisation of narrow GEMMs."""
    eff = sympy.Integer(1)
    for x in dims:
        eff = eff * x / (x + c)
    return eff


def compute_split(flops: float, hbm_bytes: float, dims, cluster, kernel=(), fp8: bool = False) -> dict:
    """Seconds of forward + backward on one GPU per micro-batch, by kind (gemm, attention, memory, launch).
    With the cluster's kernel model (kernels.py) from `kernel` (OpTerms.kernel evaluated); without it, the smooth
    size efficiency prod x / (x + gemm_half_size) on all FLOPs (CPU clusters, fitted by calibrate)."""
    if cluster.kernels is not None and kernel:
        return kernels.train_seconds(flops, hbm_bytes, kernel[0], kernel[1], kernels.split(list(kernel[2:])),
                                     cluster, fp8)
    if dims:
        eff = 1.0
        for x in dims:
            eff *= x / (x + cluster.gemm_half_size)
        gemm = 3 * flops / (cluster.achievable_flops * eff)
    else:
        gemm = 3 * flops / cluster.peak_flops
    return {"gemm": gemm, "attention": 0.0, "memory": 3 * hbm_bytes / cluster.hbm_bandwidth, "launch": 0.0}


def compute_time(flops: float, hbm_bytes: float, dims, cluster, kernel=()) -> float:
    """compute_split summed: seconds of forward + backward on one GPU per micro-batch."""
    return sum(compute_split(flops, hbm_bytes, dims, cluster, kernel).values())


def compute_time_expr(tm: OpTerms, cluster) -> sympy.Expr:
    """Seconds of forward + backward compute per micro-batch on one GPU (symbolic in B, S, n)."""
    gemm = 3 * tm.flops / (cluster.achievable_flops * size_efficiency(tm.gemm_dims, cluster.gemm_half_size)) \
        if tm.gemm_dims else 3 * tm.flops / cluster.peak_flops
    return gemm + 3 * tm.hbm_bytes / cluster.hbm_bandwidth

"""Per-GPU memory of one op under one strategy: parameters, gradients, optimizer state, saved activations.

Training state per parameter (mixed precision, Megatron-style): BF16 weight (2 B) + FP32 gradient accumulator
(4 B, docs/reference.md, "Memory") + Adam's FP32 master copy, m and v (12 B). With the distributed optimizer
(ZeRO-1, on by default) the 12 B are sharded over every rank that holds a replica of the parameter: the d data
ranks for parameters split on the model axis, all n·d ranks for parameters replicated on it.

Parameters come in two kinds per strategy, from its parameter layout (ir/strategies): `split` (divided over the
model axis; gradients reduced over the d data-parallel ranks) and `replicated` (whole on every rank of the model
axis, whose gradients are partial sums over it, so they are reduced over n·d ranks).

With full activation recomputation (pricing.MeshConfig.recompute) an op keeps only its inputs and reruns its
forward, collectives included, during backward.

Activations are what backward needs, in BF16 (FP32 for router logits, norm statistics and the loss's logits),
per micro-batch, for B sequences of S tokens per data-parallel replica. Symbols: B, S (graph.py) and n. These are
what meshplan's runtime keeps; plans priced as Megatron-Core runs them keep less (plan_settings.py,
MeshConfig.megatron; docs/reference.md, "Memory").
"""
from __future__ import annotations

import sympy

from ..ir import graph as G
from ..ir.graph import N, Op
from ..ir.placement import Shard
from ..ir.strategies import strategy_of

ACT_BYTES, FP32 = 2, 4
WEIGHT_GRAD_BYTES = 2 + 4  # bf16 weight + fp32 gradient
OPTIMIZER_BYTES = 12  # fp32 master + Adam m, v
DP = "dp"  # pseudo-strategy: the op is data parallel on the model axis too (Plan: strategy replicate, axis None)


def shape(op: Op, cand: str) -> tuple[str, bool]:
    """What a strategy's compute and activations depend on (ir/strategies): what its model axis splits ("heads",
    "sequence", "experts", "ffn", "vocab", "none"; "batch" for DP) and whether a rank holds 1/n of the op's tokens
    (its native input is sharded). A new strategy with the shape of an existing one is priced like it."""
    if cand == DP:
        return "batch", True
    strat = strategy_of(op.kind, cand)
    if strat is None:
        raise ValueError(f"{op.kind} has no strategy {cand!r} (ir/strategies)")
    return strat.shards, isinstance(strat.native[0], Shard)


def no_terms(op: Op, cand: str) -> ValueError:
    split, sharded = shape(op, cand)
    return ValueError(f"planner: no compute or activation terms for {op.kind} strategy {cand!r} (splits {split}, "
                      f"{'sharded' if sharded else 'whole'} tokens); add them to planner/cost_model.py and memory.py")


def _kv_shards(op: Op):
    """KV heads are split over min(n, n_kv_heads) ranks and replicated beyond (strategies.divisibility_error)."""
    return sympy.Min(N, op.attrs["n_kv_heads"])


def param_split(op: Op, cand: str) -> tuple[sympy.Expr, sympy.Expr]:
    """(split-group, replicated-group) parameter elements on one GPU, as functions of n: the strategy's parameter
    layout (ir/strategies) over the op's parameter shapes. Every parameter the layout leaves whole is on every
    rank of the model axis and its gradient is a partial sum over it (the ranks saw different tokens, or, under
    "replicate", the runtime seeds the output gradient on one rank only), so it is reduced over all n·d ranks.
    Data parallel on the model axis (DP) splits nothing."""
    if op.params == 0:
        return sympy.Integer(0), sympy.Integer(0)
    strat = strategy_of(op.kind, cand)
    if strat is None:
        return sympy.Integer(0), sympy.Integer(op.params)
    return strat.layout(op)


def static_bytes(split, replicated, n: int, d: int, zero: bool = True):
    """Weights + gradients + optimizer state of one op on one GPU (ZeRO-1 over each parameter's replica group)."""
    opt = OPTIMIZER_BYTES * (split / d + replicated / (n * d)) if zero else OPTIMIZER_BYTES * (split + replicated)
    return WEIGHT_GRAD_BYTES * (split + replicated) + opt


def checkpoint_bytes(op: Op, sharded_input: bool) -> sympy.Expr:
    """What an op keeps under full activation recomputation: its inputs as this rank holds them (backward reruns
    the forward from them: docs/reference.md, "Memory": rematerialisation, taken to the whole op)."""
    total = sympy.Integer(0)
    for m in op.input_metas:
        total += m.numel * (ACT_BYTES if m.dtype.startswith(("float", "bfloat")) else 8)
    return total / N if sharded_input else total


def activation_bytes(op: Op, cand: str) -> sympy.Expr:
    """Bytes saved for backward by one op on one GPU, per micro-batch (B sequences of S tokens per replica)."""
    t = G.B * G.S
    a = op.attrs
    split, sharded = shape(op, cand)
    loc = t / N if sharded else t  # tokens whose input this rank holds
    whole = split == "none" and not sharded  # every rank computes the whole op
    if op.kind == G.ATTENTION:
        q, kv = a["n_heads"] * a["head_dim"], 2 * a["n_kv_heads"] * a["head_dim"]
        lse = FP32 * t * a["n_heads"]  # softmax statistics per head and token
        if whole:
            return ACT_BYTES * t * (a["dim"] + 2 * q + kv) + lse
        if split == "batch":
            return (ACT_BYTES * t * (a["dim"] + 2 * q + kv) + lse) / N
        if split not in ("sequence", "heads"):
            raise no_terms(op, cand)
        # sp: input, q, core output (head-sharded) and wo input (sequence-sharded) are 1/n each; tp: the input is
        # whole (replicated), core output is wo's input.
        shards = 3 if split == "sequence" else 2
        return ACT_BYTES * (loc * a["dim"] + shards * t * q / N + t * kv / _kv_shards(op)) + lse / N
    if op.kind == G.MOE:
        d, f, e, k, sh = a["dim"], a["ffn_dim"], a["n_experts"], a["top_k"], a["shared_hidden"]
        # input, routed copies in and out of the experts, w1/w3 outputs and w2 input, shared expert internals
        routed = k * t * (2 * d + 3 * f)
        if whole:
            return ACT_BYTES * (t * d + routed + 3 * t * sh) + FP32 * t * e
        if sharded:  # ep, seq, dp
            return (ACT_BYTES * (t * d + routed + 3 * t * sh) + FP32 * t * e) / N
        if split == "ffn":  # tp: every rank permutes all tokens; only the expert hidden is split
            return ACT_BYTES * (t * d + k * t * 2 * d + 3 * k * t * f / N + 3 * t * sh / N) + FP32 * t * e
        if split != "experts":
            raise no_terms(op, cand)
        # ag_scatter: gathered input and router logits whole, local experts' share of the routed tokens
        return ACT_BYTES * (t * d + routed / N + 3 * t * sh / N) + FP32 * t * e
    if op.kind == G.FFN:
        h = a["hidden"]
        if split == "ffn":
            return ACT_BYTES * (t * a["dim"] + 3 * t * h / N)
        return ACT_BYTES * loc * (a["dim"] + 3 * h)
    if op.kind == G.NORM:
        return (ACT_BYTES * a["dim"] + FP32) * loc
    if op.kind in (G.LINEAR, G.LM_HEAD):
        inp = ACT_BYTES * a["in_features"] * (t / N if split == "ffn" else loc)
        logits = FP32 * a["out_features"] * loc if op.kind == G.LM_HEAD else 0  # the loss keeps its softmax
        return inp + logits
    if op.kind == G.EMBEDDING:
        return 8 * (loc if split != "vocab" else t / N)  # int64 token ids
    if op.kind == G.GENERIC:
        if op.attrs.get("target") in ("add", "sub", "iadd", "neg"):
            return sympy.Integer(0)  # linear ops keep nothing for backward
        elems = sum((m.numel for m in op.input_metas), sympy.Integer(0))
        return ACT_BYTES * elems * (1 / N if sharded else 1)
    return sympy.Integer(0)

"""The MoE pieces every strategy shares: routing, the capacity decision, local experts, the weighted combine.

All of it reuses the reference's functions (route, expert_capacity, keep_mask, GroupedExperts.expert), so a
strategy only decides which tokens meet which experts where.

Capacity: the single-device model keeps, per expert, the first `capacity` (token, slot) assignments in global
token order over the whole batch. A rank sees only some tokens, so the routed expert ids (integers, k per token)
are all-gathered over every axis the tokens are split on, the reference's keep_mask runs on the whole batch, and
each rank keeps its own rows: the same tokens are dropped as on one device, under every strategy.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..ir.strategies import strategy_of
from ..models.moe_transformer import (
    GroupedExperts,
    accumulation_dtype,
    expert_capacity,
    keep_mask,
    route,
    route_variant,
    router_logits,
)
from .moe_kernels import combine_rows, expert_ffn_sorted, use_triton
from .op_context import OpContext


def route_tokens(ctx: OpContext, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xt [T, D] -> (weights [T, k] float32, expert ids [T, k]), with the (replicated) router and the op's
    routing variant (attrs: scoring, n_group, topk_group, routed_scale, score_bias, router_fp32)."""
    a, p = ctx.attrs, ctx.params
    if "scoring" not in a and not a.get("router_fp32"):  # meshplan's softmax top-k
        return route(F.linear(xt, p["gate.weight"]), a["top_k"], a["norm_topk_prob"])
    return route_variant(router_logits(xt, p["gate.weight"], a.get("router_fp32", False)), a, p.get("score_bias"))


def capacity_keep(ctx: OpContext, idx: torch.Tensor, local_shape: tuple[int, int]) -> torch.Tensor:
    """[T, k] bool: which of this rank's assignments the single-device model keeps."""
    a = ctx.attrs
    cap = expert_capacity(ctx.batch * ctx.seq, a["top_k"], a["n_experts"], a["capacity_factor"])
    if cap is None:
        return torch.ones_like(idx, dtype=torch.bool)
    b, s = local_shape
    placement, full = ctx.plan.input, ctx.replicated()
    with torch.no_grad():
        every = ctx.redistribute(idx.view(b, s, -1), placement, full, "capacity")  # [B, S, k] on every rank
        keep = keep_mask(every.reshape(-1, every.shape[-1]), a["n_experts"], cap).view(every.shape)
        return ctx.redistribute(keep, full, placement, "capacity").reshape(idx.shape)


def assignments(idx: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept (token, slot) pairs in token order, and their experts."""
    tok, slot = keep.nonzero(as_tuple=True)
    return tok, slot, idx[tok, slot]


def run_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, expert: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
    """Row i of x through expert expert[i] of the stacked (local) weights: sort rows by expert, one GEMM group
    per expert (the reference's GroupedExperts.expert, or the grouped Triton kernel), and put the rows back in
    their order."""
    order = torch.argsort(expert, stable=True)
    xs = x[order]
    counts = torch.bincount(expert, minlength=w1.shape[0])
    if use_triton(x, "run_experts"):  # grouped GEMMs, SwiGLU fused (codegen's kernel; moe_kernels.py)
        return expert_ffn_sorted(w1, w3, w2, counts, xs)[torch.argsort(order)]
    counts = counts.tolist()
    weights = SimpleNamespace(w1=w1, w2=w2, w3=w3)
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(GroupedExperts.expert(weights, e, xs[start:start + c]))
            start += c
    if not outs:
        # No rows: still an autograd path from x and the weights, so that the backward of every collective around
        # this call runs on this rank as on the others (a missing path would skip one and deadlock its peers).
        return GroupedExperts.expert(weights, 0, xs)
    return torch.cat(outs)[torch.argsort(order)]


def combine(n_tokens: int, tok: torch.Tensor, slot: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of expert outputs per token, in float32 (float64 for float64) as the reference does. Row i of
    y belongs to the pair (tok[i], slot[i]); on the Triton path one fused kernel gathers and sums each token's rows."""
    if use_triton(y, "combine"):
        return combine_rows(n_tokens, tok, slot, y, weights, dtype)
    acc = accumulation_dtype(y.dtype)
    out = torch.zeros(n_tokens, y.shape[-1], dtype=acc, device=y.device)
    out = out.index_add(0, tok, y.to(acc) * weights[tok, slot, None])
    return out.to(dtype)


def experts(ctx: OpContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (w1, w3, w2). Fused w13 [E, 2F, D] is split into its gate and up halves; where the strategy
    splits the experts' hidden dimension ("tp", ir/strategies/moe.py) it is held whole and this rank takes its F/n
    rows of each half, matching w2's split columns."""
    p = ctx.params
    if "experts.w13" not in p:
        if "experts.w1" not in p or "experts.w3" not in p:
            raise RuntimeError(f"op {ctx.op.name!r}: the experts need w1 and w3, or a fused w13")
        return p["experts.w1"], p["experts.w3"], p["experts.w2"]
    w13, w2 = p["experts.w13"], p["experts.w2"]
    f_all, f = w13.shape[1] // 2, w2.shape[2]
    hidden_split = strategy_of(ctx.op.kind, ctx.plan.strategy).split_dim(ctx.op, "experts.w2", ctx.n) == 2
    lo = ctx.index * f if hidden_split else 0
    return w13[:, lo:lo + f], w13[:, f_all + lo:f_all + lo + f], w2


def shared_params(ctx: OpContext) -> dict[str, torch.Tensor]:
    return {k.removeprefix("shared."): v for k, v in ctx.params.items() if k.startswith("shared.")}


def shared_out(ctx: OpContext, xt: torch.Tensor) -> torch.Tensor:
    """The shared experts on rows xt, scaled per row by sigmoid(shared_gate) when the block has one (Qwen2-MoE).
    The gate is replicated: it scales a Partial (tp) summand row by row, which sums to the gated whole."""
    out = functional_call(ctx.module.shared, shared_params(ctx), (xt,))
    gate = ctx.params.get("shared_gate.weight")
    return torch.sigmoid(F.linear(xt, gate)) * out if gate is not None else out

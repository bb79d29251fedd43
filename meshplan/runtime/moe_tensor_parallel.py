"""MoE strategies that take the tokens replicated on the model axis and leave a Partial sum ("tp", "ag_scatter"),
and the communication-free ones ("seq", "replicate").

- "tp": every expert's hidden dimension split (w1/w3 rows, w2 columns, and the shared experts likewise). Every
  rank routes every token (the router is replicated), runs all experts on its hidden slice, and the weighted sum
  of the slices is the Partial output.
- "ag_scatter" (docs/reference.md's adjusted pattern for large top-k): the all-gather is the edge into the op; each rank
  routes every token, scatters the assignments of its own experts locally, runs them (grouped GEMM), gathers the
  results back into token order, and its weighted sum is a Partial that the edge out reduce-scatters. Shared
  experts (replicated weights) are computed on a 1/n slice of the tokens per rank, zero elsewhere, so that they
  too add up exactly once.
- "seq"/"replicate": all experts local; the same code with unsplit weights on the rows this rank holds.
Capacity, when set, is decided on the whole batch (moe_routing.capacity_keep) under every strategy.
"""
from __future__ import annotations

import torch

from .moe_routing import assignments, capacity_keep, combine, experts, route_tokens, run_experts, shared_out
from .op_context import OpContext


def moe_local(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    """"tp", "seq" and "replicate": every expert on this rank, whole or split on its hidden dimension."""
    b, s, d = x.shape
    xt = x.reshape(-1, d)
    weights, idx = route_tokens(ctx, xt)
    tok, slot, expert = assignments(idx, capacity_keep(ctx, idx, (b, s)))
    y = run_experts(*experts(ctx), expert, xt[tok])
    out = combine(xt.shape[0], tok, slot, y, weights, x.dtype)
    if ctx.module.shared is not None:
        out = out + shared_out(ctx, xt)
    return out.view(b, s, d)


def moe_ag_scatter(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    b, s, d = x.shape
    xt = x.reshape(-1, d)
    weights, idx = route_tokens(ctx, xt)
    tok, slot, expert = assignments(idx, capacity_keep(ctx, idx, (b, s)))
    w1, w3, w2 = experts(ctx)
    per_rank = w1.shape[0]
    mine = (expert // per_rank) == ctx.index
    tok, slot, expert = tok[mine], slot[mine], expert[mine] - ctx.index * per_rank
    y = run_experts(w1, w3, w2, expert, xt[tok])
    out = combine(xt.shape[0], tok, slot, y, weights, x.dtype)
    if ctx.module.shared is not None:
        lo, hi = token_slice(xt.shape[0], ctx.n, ctx.index)
        part = shared_out(ctx, xt[lo:hi])
        out = out + torch.cat([part.new_zeros(lo, d), part, part.new_zeros(xt.shape[0] - hi, d)])
    return out.view(b, s, d)


def token_slice(n_tokens: int, n: int, index: int) -> tuple[int, int]:
    """Rank `index`'s rows [lo, hi) of n_tokens split as tensor_split splits them (the first n_tokens % n ranks
    take one more), from the sizes alone: no tensor read, so it traces as constants."""
    base, extra = divmod(n_tokens, n)
    lo = index * base + min(index, extra)
    return lo, lo + base + int(index < extra)

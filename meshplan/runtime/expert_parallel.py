"""Expert parallelism ("ep"): sequence-sharded tokens in and out, experts split over the model axis.

Rank r holds experts [r·E/n, (r+1)·E/n). Each rank routes its own tokens with the replicated router, sorts its
kept (token, slot) assignments by expert, and tells every rank how many rows it will send for each of that rank's
experts (an all_to_all_single of counts). The rows then travel with uneven splits (dispatch), each rank runs its
experts on what arrived, the results travel back the reverse way (combine), and the sender forms the weighted
sum in token order. Dropless by default; with a capacity factor the single-device choice of dropped tokens is
reproduced exactly (moe_routing.capacity_keep). Bytes each rank sends: (rows it dispatches to other ranks) · D in
each direction, k/n·b·s/n·D·(n-1) expected under uniform routing (REFERENCE.md, V_EP).
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from .collectives import all_to_all_single, exchange_rows
from .moe_routing import assignments, capacity_keep, combine, experts, route_tokens, run_experts, shared_params
from .op_context import OpContext


def moe_ep(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    b, s, d = x.shape
    n, n_experts = ctx.n, ctx.attrs["n_experts"]
    per_rank = n_experts // n
    xt = x.reshape(-1, d)
    weights, idx = route_tokens(ctx, xt)
    tok, slot, expert = assignments(idx, capacity_keep(ctx, idx, (b, s)))
    order = torch.argsort(expert, stable=True)  # grouped by destination rank, then by expert
    tok, slot, expert = tok[order], slot[order], expert[order]

    counts = torch.bincount(expert, minlength=n_experts).view(n, per_rank)  # rows for each rank's experts
    recv_counts = all_to_all_single(counts, [1] * n, [1] * n, ctx.channel("counts")).view(n, per_rank)
    send = counts.sum(1).tolist()
    recv = recv_counts.sum(1).tolist()

    rows = exchange_rows(xt[tok], recv, send, ctx.channel("dispatch"))  # by source rank, then by local expert
    local_expert = torch.arange(per_rank, device=x.device).repeat(n).repeat_interleave(recv_counts.reshape(-1))
    y = run_experts(*experts(ctx), local_expert, rows)
    y = exchange_rows(y, send, recv, ctx.channel("combine"))  # back in the order this rank sent

    out = combine(xt.shape[0], tok, slot, y, weights, x.dtype)
    if ctx.module.shared is not None:
        out = out + functional_call(ctx.module.shared, shared_params(ctx), (xt,))
    return out.view(b, s, d)

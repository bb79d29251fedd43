"""Expert parallelism ("ep"): sequence-sharded tokens in and out, experts split over the model axis.

Rank r holds experts [r·E/n, (r+1)·E/n). Each rank routes its own tokens with the replicated router, sorts its
kept (token, slot) assignments by expert, and tells every rank how many rows it will send for each of that rank's
experts (an all_to_all_single of counts). The rows then travel with uneven splits (dispatch), each rank runs its
experts on what arrived, the results travel back the reverse way (combine), and the sender forms the weighted
sum in token order. Dropless by default; with a capacity factor the single-device choice of dropped tokens is
reproduced exactly (moe_routing.capacity_keep). Bytes each rank sends: (rows it dispatches to other ranks) · D in
each direction, k/n·b·s/n·D·(n-1) expected under uniform routing (docs/reference.md, "Communication volumes").
Under torch.compile the split sizes are unbacked SymInts (moe_routing.split_sizes, compile.py): one graph for
every routing, and the bytes booked are the ones this call's graph computed.

FP8 dispatch (plan precision["dispatch"] == "fp8"; docs/reference.md, "Communication compression"): each token is
quantised once with a per-token scale, its k copies made by codegen's fused `permute(..., quantize=True)` (the
same kernel a GPU run uses; its torch reference on CPU), and the codes travel as uint8 with their float32 scales
beside them: (D + 4)/(4·D) of the fp32 bytes. The receiver dequantises before its experts. The backward sends the
rows' gradients back in the channel's precision. The combine is untouched unless precision["combine"] says so.
"""
from __future__ import annotations

import torch
from torch.autograd import Function

from ..ir.strategies import COMBINE, COUNTS, DISPATCH
from ..kernels import dequantize_fp8, permute, quantize_fp8
from .collectives import Channel, _a2a_single_raw, all_to_all_single, exchange_rows
from .comm_stats import BWD, FWD
from .moe_routing import (
    assignments,
    capacity_keep,
    combine,
    expert_counts,
    experts,
    route_tokens,
    run_experts,
    shared_out,
    split_sizes,
)
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

    counts = expert_counts(expert, n_experts).view(n, per_rank)  # rows for each rank's experts
    recv_counts = all_to_all_single(counts, [1] * n, [1] * n, ctx.channel(COUNTS)).view(n, per_rank)
    send = split_sizes(counts.sum(1), tok.shape[0])
    recv = split_sizes(recv_counts.sum(1))

    dispatch = ctx.channel(DISPATCH)
    if dispatch.precision == "fp8" and n > 1:
        dropless = tok.numel() == idx.numel()  # then tok is exactly permute's order: (token, slot) sorted by expert
        rows = _Fp8Dispatch.apply(xt, tok, idx if dropless else None, per_rank, recv, send, dispatch)
    else:
        rows = exchange_rows(xt[tok], recv, send, dispatch)  # by source rank, then by local expert
    local_expert = torch.arange(per_rank, device=x.device).repeat(n).repeat_interleave(
        recv_counts.reshape(-1), output_size=rows.shape[0])
    y = run_experts(*experts(ctx), local_expert, rows)
    y = exchange_rows(y, send, recv, ctx.channel(COMBINE))  # back in the order this rank sent

    out = combine(xt.shape[0], tok, slot, y, weights, x.dtype)
    if ctx.module.shared is not None:
        out = out + shared_out(ctx, xt)
    return out.view(b, s, d)


class _Fp8Dispatch(Function):
    """xt [T, D] -> the rows other ranks send here, dequantised; rows leave as per-token FP8 codes + scales."""

    @staticmethod
    def forward(ctx, xt, tok, topk_idx, per_rank, recv, send, ch: Channel):
        if topk_idx is not None:  # dropless: the fused permute + quantise kernel builds the send buffer
            p = permute(xt.detach(), topk_idx, per_rank * len(send),
                        experts_per_rank=per_rank, quantize=True)
            codes, scales = p.buf, p.scales
        else:  # capacity dropped some pairs: quantise each token once, then copy the kept rows
            q, s = quantize_fp8(xt.detach())
            codes, scales = q[tok], s[tok]
        codes = _a2a_single_raw(codes.view(torch.uint8), recv, send, ch, FWD)
        scales = _a2a_single_raw(scales, recv, send, ch, FWD)
        ctx.save_for_backward(tok)
        ctx.meta = (xt.shape, recv, send, ch)
        return dequantize_fp8(codes, scales, out_dtype=xt.dtype)

    @staticmethod
    def backward(ctx, g):
        (tok,) = ctx.saved_tensors
        shape, recv, send, ch = ctx.meta
        rows = all_to_all_single(g, send, recv, ch, BWD)  # the reverse exchange, in the channel's wire format
        gx = rows.new_zeros(shape).index_add_(0, tok, rows.to(rows.dtype))
        return gx, None, None, None, None, None, None

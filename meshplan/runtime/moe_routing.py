"""The MoE pieces every strategy shares: routing, the capacity decision, local experts, the weighted combine.

All of it reuses the reference's functions (route, expert_capacity, keep_mask, GroupedExperts.expert), so a
strategy only decides which tokens meet which experts where.

Capacity: the single-device model keeps, per expert, the first `capacity` (token, slot) assignments in global
token order over the whole batch. A rank sees only some tokens, so the routed expert ids (integers, k per token)
are all-gathered over every axis the tokens are split on, the reference's keep_mask runs on the whole batch, and
each rank keeps its own rows: the same tokens are dropped as on one device, under every strategy.
"""
from __future__ import annotations

from typing import NamedTuple

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


def capacity_keep(ctx: OpContext, idx: torch.Tensor, local_shape: tuple[int, int]) -> torch.Tensor | None:
    """[T, k] bool: which of this rank's assignments the single-device model keeps; None when dropless (all)."""
    a = ctx.attrs
    cap = expert_capacity(ctx.batch * ctx.seq, a["top_k"], a["n_experts"], a["capacity_factor"])
    if cap is None:
        return None
    b, s = local_shape
    placement, full = ctx.plan.input, ctx.replicated()
    with torch.no_grad():
        every = ctx.redistribute(idx.view(b, s, -1), placement, full, "capacity")  # [B, S, k] on every rank
        keep = keep_mask(every.reshape(-1, every.shape[-1]), a["n_experts"], cap).view(every.shape)
        return ctx.redistribute(keep, full, placement, "capacity").reshape(idx.shape)


def assignments(idx: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept (token, slot) pairs in token order, and their experts. Dropless (keep None) they are every pair,
    in an order known without reading the routing: static shapes under torch.compile, where `nonzero` would make
    the row count data-dependent."""
    if keep is None:
        t, k = idx.shape
        tok = torch.arange(t, device=idx.device).repeat_interleave(k)
        return tok, torch.arange(k, device=idx.device).repeat(t), idx.reshape(-1)
    tok, slot = keep.nonzero(as_tuple=True)
    return tok, slot, idx[tok, slot]


def expert_counts(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[n_experts] int64: rows per expert (a bincount whose length does not depend on the largest id)."""
    return torch.zeros(n_experts, dtype=torch.int64, device=expert.device).index_add_(
        0, expert, torch.ones_like(expert))


def split_sizes(counts: torch.Tensor, total: int | None = None) -> list[int]:
    """counts [n] as split sizes: Python ints in eager, unbacked SymInts under torch.compile (dynamo's
    capture_scalar_outputs, compile.py), which the checks declare to be sizes (and to sum to `total`)."""
    sizes = counts.tolist()
    for c in sizes:
        torch._check(c >= 0)
    if total is not None:
        torch._check(sum(sizes) == total)
    return sizes


class _Weights(NamedTuple):
    """What GroupedExperts.expert reads from its module (a NamedTuple: dynamo traces it, not a SimpleNamespace)."""

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


def run_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, expert: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
    """Row i of x through expert expert[i] of the stacked (local) weights: sort rows by expert, one GEMM group
    per expert (the reference's GroupedExperts.expert, or the grouped Triton kernel), and put the rows back in
    their order.

    Every expert runs, on its split of the sorted rows (an empty one is a GEMM of zero rows: no Python branch on
    the routing, so one compiled graph serves every routing, and every weight and the rows keep an autograd path,
    so the backward of every collective around this call runs on every rank). Not torch._grouped_mm: in torch
    2.13 on CPU it runs float32 eagerly (equal to these GEMMs) but has no float64, and its fake-tensor rule takes
    bf16 only, so torch.compile refuses a float32 model."""
    order = torch.argsort(expert, stable=True)
    xs = x[order]
    counts = expert_counts(expert, w1.shape[0])
    if use_triton(x, "run_experts"):  # grouped GEMMs, SwiGLU fused (codegen's kernel; moe_kernels.py)
        return expert_ffn_sorted(w1, w3, w2, counts, xs)[torch.argsort(order)]
    weights = _Weights(w1, w3, w2)
    parts = xs.split(split_sizes(counts, xs.shape[0]))
    y = torch.cat([GroupedExperts.expert(weights, e, part) for e, part in enumerate(parts)])
    return y[torch.argsort(order)]


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

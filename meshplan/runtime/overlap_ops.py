"""The compute phases the emitted overlap code calls, one function per compute task of codegen/phases.py.

ulysses_attention.attention_sp and expert_parallel.moe_ep are each one straight line: compute, all-to-all,
compute, all-to-all, compute. Here they are cut at their collectives, so that codegen/emit.py can interleave
micro-batch chunks: chunk i's all-to-all is issued (async_collectives.start_*) and chunk i+1's compute runs
before anything waits on it. Every piece is the same arithmetic as the straight-line version on a slice of the
batch, and every op treats samples independently, so the concatenated chunks equal the unchunked op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.strategies import COUNTS
from .collectives import all_to_all_single
from .moe_routing import assignments, capacity_keep, combine, experts, route_tokens, run_experts, shared_out
from .op_context import OpContext
from .ulysses_attention import sp_core, sp_out_proj, sp_qkv  # noqa: F401 - the emitted code's names


def split_batch(x: torch.Tensor, chunks: int, op: str) -> list[torch.Tensor]:
    if x.shape[0] % chunks:
        raise RuntimeError(f"op {op!r}: the emitted overlap code splits this rank's batch of {x.shape[0]} into "
                           f"{chunks} chunks; re-emit it for this batch size (chunks must divide it)")
    return list(x.chunk(chunks, 0))


# ---- Ulysses attention: qkv -> qkv_a2a -> core -> out_a2a -> out_proj (phases in ulysses_attention.py) --------


# ---- EP MoE: route -> dispatch -> experts -> combine -> (shared) -> unpermute ---------------------------------
@dataclass
class Routed:
    """One chunk's routing: what dispatch sends, and what unpermute needs to put the results back."""

    shape: tuple[int, int, int]
    weights: torch.Tensor  # [T, k] float32
    tok: torch.Tensor  # kept (token, slot) pairs, sorted by expert (so grouped by destination rank)
    slot: torch.Tensor
    rows: torch.Tensor  # xt[tok]: the rows dispatch sends
    send: list[int]  # rows to each rank
    recv: list[int]  # rows from each rank
    recv_counts: torch.Tensor  # [n, experts per rank]: rows from each rank for each local expert


def ep_keep(ctx: OpContext, x: torch.Tensor, chunks: int) -> list[torch.Tensor | None]:
    """Per chunk, which of its assignments the single-device model keeps (None without a capacity factor). The
    capacity decision needs the whole batch's routing, so with a capacity factor the router runs once on all of
    this rank's tokens first (a synchronous collective; the chunks' routing below repeats the same GEMM rows)."""
    if ctx.attrs.get("capacity_factor") is None:
        return [None] * chunks
    b, s, d = x.shape
    with torch.no_grad():
        _, idx = route_tokens(ctx, x.reshape(-1, d))
        keep = capacity_keep(ctx, idx, (b, s))
    return list(keep.chunk(chunks, 0))


def ep_route(ctx: OpContext, x: torch.Tensor, keep: torch.Tensor | None) -> Routed:
    """Route one chunk, sort its assignments by expert, and swap row counts with every rank (a few integers,
    synchronous: the dispatch's splits depend on them)."""
    b, s, d = x.shape
    n, per_rank = ctx.n, ctx.attrs["n_experts"] // ctx.n
    xt = x.reshape(-1, d)
    weights, idx = route_tokens(ctx, xt)
    tok, slot, expert = assignments(idx, keep if keep is not None else torch.ones_like(idx, dtype=torch.bool))
    order = torch.argsort(expert, stable=True)
    tok, slot, expert = tok[order], slot[order], expert[order]
    counts = torch.bincount(expert, minlength=n * per_rank).view(n, per_rank)
    recv_counts = all_to_all_single(counts, [1] * n, [1] * n, ctx.channel(COUNTS)).view(n, per_rank)
    return Routed((b, s, d), weights, tok, slot, xt[tok], counts.sum(1).tolist(), recv_counts.sum(1).tolist(),
                  recv_counts)


def ep_experts(ctx: OpContext, r: Routed, rows: torch.Tensor) -> torch.Tensor:
    """This rank's experts on the rows that arrived (by source rank, then by local expert)."""
    per_rank = r.recv_counts.shape[1]
    local_expert = torch.arange(per_rank, device=rows.device).repeat(ctx.n).repeat_interleave(
        r.recv_counts.reshape(-1))
    return run_experts(*experts(ctx), local_expert, rows)


def ep_shared(ctx: OpContext, x: torch.Tensor) -> torch.Tensor | None:
    """Shared experts on the chunk's tokens (they need no collective: filler while the all-to-alls run)."""
    if ctx.module.shared is None:
        return None
    return shared_out(ctx, x.reshape(-1, x.shape[-1]))


def ep_unpermute(ctx: OpContext, r: Routed, y: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs (in the order this rank sent them), plus the shared experts."""
    b, s, d = r.shape
    out = combine(b * s, r.tok, r.slot, y, r.weights, y.dtype)
    if shared is not None:
        out = out + shared
    return out.view(b, s, d)

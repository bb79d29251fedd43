"""Ulysses sequence parallelism for attention ("sp"): sequence-sharded in, sequence-sharded out.

Each rank projects q/k/v for its sequence chunk with the (replicated) weights, then one all-to-all turns
[b, s/n, heads] into [b, s, heads/n]: query head group g and its KV heads go to rank g, and the chunks that arrive
are concatenated in source order, which is sequence order. Attention runs on whole sequences of a head subset
(RoPE on positions 0..s-1), and a second all-to-all turns [b, s, Hq/n] back into [b, s/n, Hq] for the replicated
output projection. Bytes each rank sends (docs/reference.md, "Communication volumes", counting sends only):
    qkv: (n-1)/n · b·(s/n)·(Hq + 2·Hkv')·hd    out: (n-1)/n · b·s·(Hq/n)·hd
with Hkv' = Hkv when n divides the KV heads, else n: with fewer KV heads than ranks each KV head is repeated
n/Hkv times before the exchange so that every rank receives exactly the one its query heads use (cheaper than
all-gathering all KV heads whenever Hkv > 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.strategies import OUT_A2A, QKV_A2A
from ..models.mla import mla_qkv
from ..models.moe_transformer import causal_attention, project_qkv, rotate
from .collectives import exchange
from .op_context import OpContext


# The three compute phases around the two all-to-alls; the emitted overlap code (codegen/emit.py) calls them per
# micro-batch chunk with the all-to-alls in flight in between.
def sp_qkv(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    """[b, s/n, D] -> [b, s/n, n, (Hq + 2 Hkv')/n, hd]: one buffer per destination rank (its query heads, then its
    KV heads), as attention_sp lays it out; exchange dims (2, 1) next."""
    a, p, n = ctx.attrs, ctx.params, ctx.n
    if a.get("mla"):
        return _mla_qkv(ctx, x)
    b, sl, _ = x.shape
    hq, n_kv, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    q, k, v = project_qkv(x, p, a)  # [b, s/n, H, hd], with the op's biases and q/k norms
    if n_kv % n:
        k, v = k.repeat_interleave(n // n_kv, dim=2), v.repeat_interleave(n // n_kv, dim=2)
    kv = k.shape[2]
    return torch.cat([q.view(b, sl, n, hq // n, hd), k.view(b, sl, n, kv // n, hd), v.view(b, sl, n, kv // n, hd)],
                     dim=3)


def sp_core(ctx: OpContext, qkv: torch.Tensor) -> torch.Tensor:
    """[b, s, 1, (Hq + 2 Hkv')/n, hd] (after the all-to-all) -> attention of this rank's heads [b, s, Hq/n, hd]."""
    a, n = ctx.attrs, ctx.n
    if a.get("mla"):
        return _mla_core(ctx, qkv)
    hq = a["n_heads"]
    qkv = qkv.squeeze(2)
    kv = (qkv.shape[2] - hq // n) // 2
    q, k, v = qkv.split([hq // n, kv, kv], dim=2)
    s = q.shape[1]
    cos, sin = ctx.params["rope_cos"][:s], ctx.params["rope_sin"][:s]
    style = a.get("rope", "interleaved")
    return causal_attention(rotate(q, cos, sin, style), rotate(k, cos, sin, style), v, scale=a.get("scale"))


def sp_out_proj(ctx: OpContext, out: torch.Tensor) -> torch.Tensor:
    """[b, s/n, Hq, hd] (after the second all-to-all) -> [b, s/n, D] with the replicated output projection."""
    b, sl = out.shape[:2]
    return F.linear(out.reshape(b, sl, -1), ctx.params["wo.weight"], ctx.params.get("wo.bias"))


def attention_sp(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    qkv = exchange(sp_qkv(ctx, x), 2, 1, ctx.channel(QKV_A2A))  # [b, s, 1, (hq + 2 kv) / n, hd]
    out = exchange(sp_core(ctx, qkv), 1, 2, ctx.channel(OUT_A2A))  # [b, s/n, hq, hd]
    return sp_out_proj(ctx, out)



# ---- multi-head latent attention (models/mla.py) ------------------------------------------------------------
# This rank's chunk of positions is projected and rotated with every head (RoPE at its global positions: the
# sequence is split over the model axis in rank order), and q, k, v of each destination's H/n heads travel as one
# flat buffer (v's head dim differs from q/k's). The latent is not exchanged: k and v are expanded per head first,
# so the bytes are V_SP's with Hkv = H.
def _mla_qkv(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    """[b, s/n, D] -> [b, s/n, n, (H/n)·(2·qk + v)]: per destination rank its heads' q, k, then v, flattened."""
    p, n = ctx.params, ctx.n
    b, sl, _ = x.shape
    lo = ctx.index * sl
    q, k, v = mla_qkv(x, p, ctx.attrs, p["rope_cos"][lo:lo + sl], p["rope_sin"][lo:lo + sl])
    return torch.cat([t.reshape(b, sl, n, -1) for t in (q, k, v)], dim=3)


def _mla_core(ctx: OpContext, buf: torch.Tensor) -> torch.Tensor:
    """[b, s, 1, (H/n)·(2·qk + v)] -> attention of this rank's heads [b, s, H/n, v]."""
    a, n = ctx.attrs, ctx.n
    h, qk, vd = a["n_heads"] // n, a["head_dim"], a["v_head_dim"]
    b, s = buf.shape[:2]
    q, k, v = buf.squeeze(2).split([h * qk, h * qk, h * vd], dim=2)
    return causal_attention(q.view(b, s, h, qk), k.view(b, s, h, qk), v.view(b, s, h, vd), scale=a.get("scale"))

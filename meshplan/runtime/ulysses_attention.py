"""Ulysses sequence parallelism for attention ("sp"): sequence-sharded in, sequence-sharded out.

Each rank projects q/k/v for its sequence chunk with the (replicated) weights, then one all-to-all turns
[b, s/n, heads] into [b, s, heads/n]: query head group g and its KV heads go to rank g, and the chunks that arrive
are concatenated in source order, which is sequence order. Attention runs on whole sequences of a head subset
(RoPE on positions 0..s-1), and a second all-to-all turns [b, s, Hq/n] back into [b, s/n, Hq] for the replicated
output projection. Bytes each rank sends (REFERENCE.md, V_SP, counting sends only):
    qkv: (n-1)/n · b·(s/n)·(Hq + 2·Hkv')·hd    out: (n-1)/n · b·s·(Hq/n)·hd
with Hkv' = Hkv when n divides the KV heads, else n: with fewer KV heads than ranks each KV head is repeated
n/Hkv times before the exchange so that every rank receives exactly the one its query heads use (cheaper than
all-gathering all KV heads whenever Hkv > 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.moe_transformer import apply_rope, causal_attention
from .collectives import exchange
from .op_context import OpContext


def attention_sp(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    a, p, n = ctx.attrs, ctx.params, ctx.n
    b, sl, _ = x.shape
    hq, n_kv, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    q = F.linear(x, p["wq.weight"]).view(b, sl, hq, hd)
    k = F.linear(x, p["wk.weight"]).view(b, sl, n_kv, hd)
    v = F.linear(x, p["wv.weight"]).view(b, sl, n_kv, hd)
    if n_kv % n:
        k, v = k.repeat_interleave(n // n_kv, dim=2), v.repeat_interleave(n // n_kv, dim=2)
    kv = k.shape[2]
    # one buffer per destination rank: its query heads, then its KV heads
    qkv = torch.cat([q.view(b, sl, n, hq // n, hd), k.view(b, sl, n, kv // n, hd), v.view(b, sl, n, kv // n, hd)],
                    dim=3)
    qkv = exchange(qkv, 2, 1, ctx.channel("qkv_a2a")).squeeze(2)  # [b, s, (hq + 2 kv) / n, hd]
    q, k, v = qkv.split([hq // n, kv // n, kv // n], dim=2)
    s = q.shape[1]
    cos, sin = p["rope_cos"][:s], p["rope_sin"][:s]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = causal_attention(q, k, v)  # [b, s, hq / n, hd]
    out = exchange(out, 1, 2, ctx.channel("out_a2a"))  # [b, s/n, hq, hd]
    return F.linear(out.reshape(b, sl, hq * hd), p["wo.weight"])

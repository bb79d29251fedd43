"""Multi-head latent attention (DeepSeek-V2/V3), the math of transformers' DeepseekV3Attention.

    q      = wq(x)                or  wq_b(q_norm(wq_a(x)))               [B, S, H, nope + rope]
    c, kr  = split(wkv_a(x), [kv_lora, rope]);  c = kv_norm(c)            kr: one RoPE key shared by all heads
    k, v   = split(wkv_b(c), [nope, v_dim]) per head;  k = [k, rotate(kr)]
    out    = wo(softmax(q kᵀ · scale) v)

Heads are independent after the shared latent, so head-split TP ("tp") runs `mla` itself on a rank's rows of
wq (or wq_b), wkv_b and its columns of wo (the latents and their norms are replicated): the result is the
rank's Partial summand. Ulysses ("sp", ulysses_attention.mla_sp) projects and rotates its sequence chunk with
every head, then exchanges q/k and v to whole sequences of a head subset. The parameter names follow meshplan's (wq, wo)
where the role is the same.
Source: transformers 5.25 DeepseekV3Attention (docs/reference.md, "Hugging Face block variants").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe_transformer import RMSNorm, causal_attention, rms_norm, rotate


def mla_qkv(x: torch.Tensor, p: dict, a: dict, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B, S, H, nope + rope] (RoPE applied for the positions cos/sin hold) and v [B, S, H, v_dim]."""
    b, s, _ = x.shape
    nope, rope, vd, eps = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"], a["norm_eps"]
    if "wq.weight" in p:
        q = F.linear(x, p["wq.weight"])
    else:
        q = F.linear(rms_norm(F.linear(x, p["wq_a.weight"], p.get("wq_a.bias")), p["q_norm.weight"], eps),
                     p["wq_b.weight"])
    q_pass, q_rot = q.view(b, s, -1, nope + rope).split([nope, rope], dim=-1)
    latent, k_rot = F.linear(x, p["wkv_a.weight"], p.get("wkv_a.bias")).split([a["kv_lora_rank"], rope], dim=-1)
    kv = F.linear(rms_norm(latent, p["kv_norm.weight"], eps), p["wkv_b.weight"]).view(b, s, -1, nope + vd)
    k_nope, v = kv.split([nope, vd], dim=-1)
    style = a.get("rope", "interleaved")
    q_rot, k_rot = rotate(q_rot, cos, sin, style), rotate(k_rot.view(b, s, 1, rope), cos, sin, style)
    q = torch.cat([q_pass, q_rot], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
    return q, k, v


def mla(x: torch.Tensor, p: dict, a: dict, cos: torch.Tensor, sin: torch.Tensor, o_bias: bool = True) -> torch.Tensor:
    """x [B, S, D] -> [B, S, D] for the heads whose rows `p` holds. o_bias: add wo's bias (once per Partial sum)."""
    b, s, _ = x.shape
    out = causal_attention(*mla_qkv(x, p, a, cos, sin), scale=a.get("scale")).reshape(b, s, -1)
    return F.linear(out, p["wo.weight"], p.get("wo.bias") if o_bias else None)


class MLAttention(nn.Module):
    """MLA with its own parameters; meshplan.hf builds it over DeepseekV3Attention's (shared, not copied)."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, norm_eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.n_heads, self.norm_eps, self.scale, self.rope_style = n_heads, norm_eps, None, "interleaved"
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.wq = nn.Linear(dim, n_heads * qk, bias=False)
        else:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=bias)
        self.register_buffer("rope_cos", torch.zeros(1, qk_rope_head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(1, qk_rope_head_dim // 2), persistent=False)

    def attrs(self) -> dict:
        dim = (self.wq if self.q_lora_rank is None else self.wq_a).in_features
        return {"dim": dim, "n_heads": self.n_heads, "n_kv_heads": self.n_heads,
                "head_dim": self.qk_nope_head_dim + self.qk_rope_head_dim, "mla": True,
                "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
                "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
                "v_head_dim": self.v_head_dim, "norm_eps": self.norm_eps, "scale": self.scale,
                "rope": self.rope_style, "o_bias": self.wo.bias is not None}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("wq", "wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo"):
            m = getattr(self, name, None)
            for k in ("weight", "bias") if m is not None else ():
                if getattr(m, k, None) is not None:
                    out[f"{name}.{k}"] = getattr(m, k)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        return mla(x, self.tensors(), self.attrs(), self.rope_cos[:s], self.rope_sin[:s])

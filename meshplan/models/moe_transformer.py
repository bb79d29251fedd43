"""The reference decoder-only MoE transformer, written plainly (gpt-fast / torchtitan style).

Every block below is a leaf the IR tracer recognises: its hyperparameters travel with the op, and the runtime
re-implements it in parallel from the same weights. The single-device forward here is the ground truth that
every parallel plan is checked against.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the model accumulates (norms, router softmax, the MoE's weighted sum): float32 for 16/32-bit
    tensors, float64 for a float64 model (a reference exact to ~1e-12, not to float32 rounding)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(accumulation_dtype(x.dtype))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, hd/2] of the angles pos * theta^(-2i/hd), computed in `dtype`."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    t = torch.arange(max_seq_len, dtype=dtype)
    freqs = torch.outer(t, inv)  # [S, hd/2]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, hd]; cos/sin: [S, hd/2] for the positions of x's sequence dimension. Rotates in float32 for
    16/32-bit x and in float64 for a float64 x (a float64 model is a reference to be exact to ~1e-12)."""
    compute = accumulation_dtype(x.dtype)
    x1, x2 = x.to(compute).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :].to(compute), sin[None, :, None, :].to(compute)
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, S, Hq, hd]; k, v: [B, S, Hkv, hd] with Hq a multiple of Hkv (GQA). Returns [B, S, Hq, hd]."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention with RoPE and a causal mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope_theta = cfg.rope_theta
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        """model.to(torch.float64) casts the float32 tables, whose angles carry float32 rounding (~1e-5 at
        position 100); recompute them in float64 instead. Other dtypes keep the cast float32 tables."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype == torch.float64:
            cos, sin = rope_tables(self.head_dim, self.rope_cos.shape[0], self.rope_theta, torch.float64)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def qkv(self, x: torch.Tensor, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, S, Hq, hd], k and v [B, S, Hkv, hd] for x at positions start_pos.., RoPE applied to q and k."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        cos, sin = self.rope_cos[start_pos : start_pos + s], self.rope_sin[start_pos : start_pos + s]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        return self.wo(causal_attention(*self.qkv(x, start_pos)).reshape(b, s, -1))


class FeedForward(nn.Module):
    """Dense SwiGLU FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: w1, w3 [E, F, D]; w2 [E, D, F]."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)) @ self.w2[e].T


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k router. logits: [T, E] -> (weights [T, k] float32 (float64 for float64 logits), expert
    ids [T, k])."""
    probs = logits.to(accumulation_dtype(logits.dtype)).softmax(dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def keep_mask(idx: torch.Tensor, n_experts: int, capacity: int | None) -> torch.Tensor:
    """[T, k] bool: which (token, slot) assignments fit their expert's capacity, first come (token order) first served."""
    if capacity is None:
        return torch.ones_like(idx, dtype=torch.bool)
    flat = idx.reshape(-1)
    onehot = F.one_hot(flat, n_experts)
    position = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)  # rank of this slot within its expert
    return (position < capacity).view_as(idx)


class MoE(nn.Module):
    """Softmax top-k router + SwiGLU experts (+ optional shared experts). Dropless unless capacity_factor is set."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.norm_topk_prob, self.capacity_factor = cfg.norm_topk_prob, cfg.capacity_factor
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.dim, cfg.ffn_dim, cfg.n_experts)
        self.shared = FeedForward(cfg.dim, cfg.ffn_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        weights, idx = route(self.gate(xt), self.top_k, self.norm_topk_prob)
        keep = keep_mask(idx, self.n_experts, expert_capacity(xt.shape[0], self.top_k, self.n_experts,
                                                               self.capacity_factor))
        acc = accumulation_dtype(x.dtype)
        out = torch.zeros_like(xt, dtype=acc)
        for e in range(self.n_experts):
            tok, slot = ((idx == e) & keep).nonzero(as_tuple=True)
            if tok.numel():
                y = self.experts.expert(e, xt[tok]).to(acc) * weights[tok, slot, None]
                out = out.index_add(0, tok, y)
        out = out.to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(xt)
        return out.view(shape)


class OutputHead(nn.Linear):
    """The final projection: to the vocabulary (LM) or to one value per token (critic)."""


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.dim, cfg.dense_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B, S] -> logits [B, S, V] (head="lm") or values [B, S] (head="value", the critic for RL)."""

    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "value"):
            raise ValueError(f"head: must be 'lm' or 'value', got {head!r}")
        self.config, self.head = cfg, head
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = OutputHead(cfg.dim, cfg.vocab_size if head == "lm" else 1, bias=False)
        if cfg.tie_embeddings and head == "lm":
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        out = self.output(self.norm(h))
        return out.squeeze(-1) if self.head == "value" else out

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self


def build_model(cfg: ModelConfig, head: str = "lm", device: str | torch.device = "cpu", seed: int = 0) -> Transformer:
    """device="meta" builds the module without memory (for the 100B+ configs); otherwise weights are seeded."""
    with torch.device(device):
        model = Transformer(cfg, head)
    if str(device) != "meta":
        model.init_weights(seed)
    return model

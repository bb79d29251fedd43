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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(accumulation_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate-half RoPE: dimension i pairs with i + hd/2 (cos/sin as in apply_rope; docs/reference.md,
    "Hugging Face block variants")."""
    compute = accumulation_dtype(x.dtype)
    c, s = cos[None, :, None, :].to(compute), sin[None, :, None, :].to(compute)
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "interleaved") -> torch.Tensor:
    """RoPE in the attention op's style (attrs["rope"]): "interleaved" (meshplan, Meta) or "half" (HF)."""
    return apply_rope_half(x, cos, sin) if style == "half" else apply_rope(x, cos, sin)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q: [B, S, Hq, hd]; k, v: [B, S, Hkv, hd] with Hq a multiple of Hkv (GQA). Returns [B, S, Hq, hd_v].
    scale: the softmax scale (None: 1/sqrt(hd))."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)


def project_qkv(x: torch.Tensor, p: dict, a: dict, kv_rows: slice | None = None):
    """q, k, v [B, S, H, hd] before RoPE from the attention parameters `p` (wq/wk/wv weights, optional biases,
    optional q_norm/k_norm weights) and the op's attrs `a`: qk_norm "head" normalises each head (Qwen3), "proj"
    the whole projection (OLMoE; needs every head, so never under head-split TP). kv_rows: the rows of wk/wv
    (and their biases) to use, for a rank that projects one shared KV head."""
    b, s, _ = x.shape
    hd, mode = a["head_dim"], a.get("qk_norm", "none")
    wk, wv, bk, bv = p["wk.weight"], p["wv.weight"], p.get("wk.bias"), p.get("wv.bias")
    if kv_rows is not None:
        wk, wv = wk[kv_rows], wv[kv_rows]
        bk, bv = (bk[kv_rows] if bk is not None else None), (bv[kv_rows] if bv is not None else None)
    q, k, v = F.linear(x, p["wq.weight"], p.get("wq.bias")), F.linear(x, wk, bk), F.linear(x, wv, bv)
    if mode == "proj":
        q, k = rms_norm(q, p["q_norm.weight"], a["qk_norm_eps"]), rms_norm(k, p["k_norm.weight"], a["qk_norm_eps"])
    q, k, v = q.view(b, s, -1, hd), k.view(b, s, -1, hd), v.view(b, s, -1, hd)
    if mode == "head":
        q, k = rms_norm(q, p["q_norm.weight"], a["qk_norm_eps"]), rms_norm(k, p["k_norm.weight"], a["qk_norm_eps"])
    return q, k, v


class Attention(nn.Module):
    """Grouped-query attention with RoPE and a causal mask.

    Variants (meshplan.hf sets them for Hugging Face families; meshplan's own model keeps the defaults): biases on
    wq/wk/wv/wo, rope_style "half", q_norm/k_norm RMSNorms with qk_norm "head" or "proj" (project_qkv), and a
    softmax `scale`. The IR carries them in the op's attrs, and every strategy reads them from there."""

    rope_style = "interleaved"
    qk_norm = "none"
    scale: float | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
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
        if self.qk_norm == "none":  # nn.Linear adds any biases itself
            q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
            k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
            v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        else:
            q, k, v = project_qkv(x, self.tensors(), self.variant_attrs())
        cos, sin = self.rope_cos[start_pos : start_pos + s], self.rope_sin[start_pos : start_pos + s]
        return rotate(q, cos, sin, self.rope_style), rotate(k, cos, sin, self.rope_style), v

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        return self.wo(causal_attention(*self.qkv(x, start_pos), scale=self.scale).reshape(b, s, -1))

    def variant_attrs(self) -> dict:
        """The variants that differ from meshplan's defaults (project_qkv, rotate, causal_attention read them)."""
        out = {"head_dim": self.head_dim}
        if self.rope_style != "interleaved":
            out["rope"] = self.rope_style
        if self.qk_norm != "none":
            out["qk_norm"], out["qk_norm_eps"] = self.qk_norm, self.q_norm.eps
        if any(m.bias is not None for m in (self.wq, self.wk, self.wv)):
            out["qkv_bias"] = True
        if self.wo.bias is not None:
            out["o_bias"] = True
        if self.scale is not None:
            out["scale"] = self.scale
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameters by module-relative name, read through attributes (so functional_call's swaps count)."""
        out = {f"{n}.{w}": getattr(getattr(self, n), w) for n in ("wq", "wk", "wv", "wo") for w in ("weight", "bias")}
        for n in ("q_norm", "k_norm"):
            if getattr(self, n) is not None:
                out[f"{n}.weight"] = getattr(self, n).weight
        return {k: v for k, v in out.items() if v is not None}


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


class FusedExperts(nn.Module):
    """E SwiGLU experts with the gate and up projections fused, as transformers 5 stores them: w13 [E, 2F, D]
    (gate rows, then up rows), w2 [E, D, F]. w1/w3 are views of w13."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    @property
    def w1(self) -> torch.Tensor:
        return self.w13[:, : self.w2.shape[2]]

    @property
    def w3(self) -> torch.Tensor:
        return self.w13[:, self.w2.shape[2]:]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return GroupedExperts.expert(self, e, x)


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k router. logits: [T, E] -> (weights [T, k] float32 (float64 for float64 logits), expert
    ids [T, k])."""
    probs = logits.to(accumulation_dtype(logits.dtype)).softmax(dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def route_variant(logits: torch.Tensor, a: dict, score_bias: torch.Tensor | None = None):
    """The router of the MoE op's attrs `a` -> (weights [T, k] float32, expert ids [T, k]). Softmax scoring is
    `route`. Sigmoid scoring (DeepSeek-V3): experts are chosen on score + score_bias among the best `topk_group`
    of `n_group` groups (a group scores its two best), weighted by the unbiased scores, normalised when
    norm_topk_prob, and scaled by routed_scale (docs/reference.md, "Hugging Face block variants")."""
    if a.get("scoring", "softmax") == "softmax":
        weights, idx = route(logits, a["top_k"], a["norm_topk_prob"])
        return (weights * a["routed_scale"], idx) if a.get("routed_scale", 1.0) != 1.0 else (weights, idx)
    scores = logits.to(accumulation_dtype(logits.dtype)).sigmoid()
    choice = scores + score_bias if score_bias is not None else scores
    groups, e = a.get("n_group", 1), scores.shape[-1]
    if groups > 1:
        group_scores = choice.view(-1, groups, e // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_scores.topk(a["topk_group"], dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        mask = mask.unsqueeze(-1).expand(-1, groups, e // groups).reshape(-1, e)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
    idx = choice.topk(a["top_k"], dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if a["norm_topk_prob"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * a.get("routed_scale", 1.0), idx


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def keep_mask(idx: torch.Tensor, n_experts: int, capacity: int | None) -> torch.Tensor:
    """[T, k] bool: which (token, slot) assignments fit their expert's capacity, first come (token order) first
    served."""
    if capacity is None:
        return torch.ones_like(idx, dtype=torch.bool)
    flat = idx.reshape(-1)
    onehot = F.one_hot(flat, n_experts)
    position = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)  # rank of this slot within its expert
    return (position < capacity).view_as(idx)


class MoE(nn.Module):
    """Softmax top-k router + SwiGLU experts (+ optional shared experts). Dropless unless capacity_factor is set.

    Variants (meshplan.hf sets them; meshplan's own model keeps the defaults): `routing` (route_variant's attrs:
    sigmoid scoring, groups, routed scale; a `score_bias` buffer), FusedExperts, and a `shared_gate` Linear(D, 1)
    whose sigmoid scales the shared experts' output per token (Qwen2-MoE)."""

    routing: dict | None = None
    router_fp32 = False  # the router's logits from float32 inputs and weights (DeepSeek-V3)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.shared_gate: nn.Linear | None = None
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.norm_topk_prob, self.capacity_factor = cfg.norm_topk_prob, cfg.capacity_factor
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.dim, cfg.ffn_dim, cfg.n_experts)
        self.shared = FeedForward(cfg.dim, cfg.ffn_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        weights, idx = self.route(xt)
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
            out = out + self.shared_out(xt)
        return out.view(shape)

    def route(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.routing is None:
            return route(self.gate(xt), self.top_k, self.norm_topk_prob)
        return route_variant(router_logits(xt, self.gate.weight, self.router_fp32), self.routing,
                             getattr(self, "score_bias", None))

    def shared_out(self, xt: torch.Tensor) -> torch.Tensor:
        return shared_output(self.shared, self.shared_gate, xt)


def router_logits(xt: torch.Tensor, weight: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    return F.linear(xt.float(), weight.float()) if fp32 else F.linear(xt, weight)


def shared_output(shared: nn.Module, gate: nn.Module | None, xt: torch.Tensor) -> torch.Tensor:
    out = shared(xt)
    return torch.sigmoid(gate(xt)) * out if gate is not None else out


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
        params = {n: p for n, p in self.named_parameters() if not p.is_meta}
        for name, value in init_values(params.items(), seed, std):
            params[name].copy_(value)
        return self


def init_values(named_params, seed: int = 0, std: float = 0.02):
    """(name, full fp32 value) of every parameter as init_weights sets it, one at a time: what a meta-built
    model's ranks slice their shards from (runtime/materialize.py)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        yield name, torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std


def build_model(cfg: ModelConfig, head: str = "lm", device: str | torch.device = "cpu", seed: int = 0) -> Transformer:
    """device="meta" builds the module without memory (for the 100B+ configs); otherwise weights are seeded."""
    with torch.device(device):
        model = Transformer(cfg, head)
    if str(device) != "meta":
        model.init_weights(seed)
    return model

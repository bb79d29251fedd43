"""Models nobody in meshplan wrote, as a user would bring them: plain torch, no meshplan blocks.

nanoGPT (Karpathy's model.py, trimmed: fused c_attn + split, SDPA, learned positions via arange, optional tying),
an nn.TransformerEncoder LM, and small models that read parameters and buffers directly in forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.n_head, self.dim = n_head, dim

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_head)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 64, block_size: int = 32, dim: int = 32, n_head: int = 4, n_layer: int = 2,
                 tied: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.h = nn.ModuleList([Block(dim, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class EncoderLM(nn.Module):
    """A causal LM over torch's own nn.TransformerEncoder (batch_first), learned positions as a parameter."""

    def __init__(self, vocab: int = 64, dim: int = 32, n_head: int = 4, n_layer: int = 2, max_len: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, n_head, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.triu(torch.full((max_len, max_len), float("-inf")), diagonal=1))

    def forward(self, tokens):
        t = tokens.size(1)
        x = self.embed(tokens) + self.pos[:, :t]
        x = self.encoder(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


class ScaledMLP(nn.Module):
    """Reads a parameter and a buffer directly in forward (no submodule owns them)."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, dim))
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) * self.scale + self.shift
        h = F.silu(self.up(x))
        x = x + self.down(h)
        return self.head(x)


class CumsumMixer(nn.Module):
    """A sequence-mixing op that looks elementwise by shape (cumsum over time) and a chunk of a Linear's output."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        a, b = self.proj(x).chunk(2, dim=-1)
        x = x + torch.cumsum(a, dim=1) / math.sqrt(x.size(1)) * torch.sigmoid(b)
        return self.head(x)


NAMED = {
    "nanogpt_tied": lambda: NanoGPT(tied=True),
    "nanogpt_untied": lambda: NanoGPT(tied=False),
    "encoder_lm": EncoderLM,
    "scaled_mlp": ScaledMLP,
    "cumsum_mixer": CumsumMixer,
}

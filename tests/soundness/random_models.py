"""Random small models from a vocabulary of plain-torch blocks, as users write them (no meshplan blocks).

A model is a token embedding (optionally plus learned positions, by `torch.arange` lookup or a sliced
parameter), a stack of blocks drawn from BLOCKS, a final norm and an LM head (optionally tied). Every block maps
[B, S, D] -> [B, S, D]; some are token-wise (MLPs, norms, split/chunk gates, parameter/buffer scaling), some mix
positions (SDPA, nn.MultiheadAttention, nn.TransformerEncoderLayer, cumsum).
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

D, HEADS, VOCAB, MAX_LEN = 16, 4, 32, 16


def _norm(kind: str) -> nn.Module:
    return nn.LayerNorm(D) if kind == "layer" else nn.RMSNorm(D)


class MLP(nn.Module):
    def __init__(self, act: str, norm: str):
        super().__init__()
        self.norm, self.up, self.down = _norm(norm), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.act = nn.GELU() if act == "gelu" else nn.SiLU()

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class SplitGate(nn.Module):
    """A fused projection cut in two by split or chunk (tuple-producing ops), gated."""

    def __init__(self, how: str):
        super().__init__()
        self.proj, self.out, self.how = nn.Linear(D, 2 * D), nn.Linear(D, D), how

    def forward(self, x):
        h = self.proj(x)
        a, b = h.chunk(2, dim=-1) if self.how == "chunk" else h.split(D, dim=2)
        return x + self.out(a * F.silu(b))


class SDPAAttention(nn.Module):
    """nanoGPT's attention: fused c_attn, split, heads by view/transpose, F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0]


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=2 * D, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class Scale(nn.Module):
    """A parameter and a buffer read directly in forward."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, D))
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, D))

    def forward(self, x):
        return x * self.gain + self.shift


class Cumsum(nn.Module):
    """Sequence-mixing although every shape says elementwise."""

    def forward(self, x):
        return x + 0.1 * torch.cumsum(x, dim=1)


BLOCKS = {
    "mlp_gelu_layer": lambda: MLP("gelu", "layer"), "mlp_silu_rms": lambda: MLP("silu", "rms"),
    "split": lambda: SplitGate("split"), "chunk": lambda: SplitGate("chunk"), "sdpa": SDPAAttention,
    "mha": MHA, "encoder": EncoderLayer, "scale": Scale, "cumsum": Cumsum,
}


class RandomLM(nn.Module):
    def __init__(self, blocks: list[str], positions: str, tied: bool, norm: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.positions = positions
        if positions == "table":
            self.pos = nn.Embedding(MAX_LEN, D)
        elif positions == "param":
            self.pos = nn.Parameter(torch.randn(1, MAX_LEN, D) * 0.1)
        self.blocks = nn.ModuleList([BLOCKS[b]() for b in blocks])
        self.norm = _norm(norm)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.positions == "table":
            x = x + self.pos(torch.arange(0, tokens.size(1), device=tokens.device))
        elif self.positions == "param":
            x = x + self.pos[:, :tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def random_lm_spec(rng: random.Random) -> dict:
    return {"blocks": [rng.choice(sorted(BLOCKS)) for _ in range(rng.randint(1, 3))],
            "positions": rng.choice(["none", "table", "param"]), "tied": rng.random() < 0.3,
            "norm": rng.choice(["layer", "rms"])}


def build(spec: dict, seed: int = 0) -> RandomLM:
    torch.manual_seed(seed)
    return RandomLM(**spec)

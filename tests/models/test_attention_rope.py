"""RoPE and causal GQA attention against references that share no code with the model (the parallel strategies
reuse the model's apply_rope and causal_attention, so a bug there would cancel out in every equivalence test).

RoPE: the complex-number form of Su et al. (RoFormer), as Llama writes it: consecutive pairs (x_2i, x_2i+1) are
the complex number x_2i + i x_2i+1, multiplied by exp(i * pos * theta^(-2i/hd)).
Attention: softmax(q k^T / sqrt(hd) + causal mask) v written out with einsum, query head h reading KV head
h // (Hq / Hkv); and torch's own scaled_dot_product_attention with an explicit mask and enable_gqa.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from meshplan.models import ModelConfig, build_model
from meshplan.models.moe_transformer import apply_rope, causal_attention, rope_tables


def complex_rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """x [B, S, H, hd] float64 at positions start.. -> rotated, by complex multiplication."""
    hd = x.shape[-1]
    pos = torch.arange(start, start + x.shape[1], dtype=torch.float64)
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(len(pos), hd // 2, dtype=torch.float64), torch.outer(pos, freq))  # e^{i angle}
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * rot[None, :, None, :]).flatten(-2)


def einsum_attention(q, k, v):
    """q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd], from the definition."""
    s, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    kv_of = torch.arange(hq) // (hq // hkv)
    scores = torch.einsum("bshd,bthd->bhst", q, k[:, :, kv_of]) / math.sqrt(q.shape[-1])
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("bhst,bthd->bshd", weights, v[:, :, kv_of])


@pytest.mark.parametrize("start", [0, 5])
def test_rope_equals_complex_rotation(start):
    """float64 end to end (tables and rotation): equal to 1e-12. Mutations tried (benchmarks/mutations.py):
    rope-reversed, apply_rope rotating by -angle ([x1 c + x2 s, x2 c - x1 s]): fails; rope-float32, apply_rope
    computing in float32 for a float64 x (the old x.float()): fails at 1e-12."""
    theta, hd = 10000.0, 16
    x = torch.randn(2, 7, 3, hd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(hd, 32, theta, torch.float64)
    got = apply_rope(x, cos[start : start + 7], sin[start : start + 7])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, complex_rope(x, start, theta), rtol=1e-12, atol=1e-12)
    # the float32 path: tables and rotation in float32, within float32 rounding of the exact rotation
    cos32, sin32 = rope_tables(hd, 32, theta)
    got32 = apply_rope(x.float(), cos32[start : start + 7], sin32[start : start + 7])
    torch.testing.assert_close(got32.double(), complex_rope(x, start, theta), rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_causal_attention_equals_definition_and_sdpa(hq, hkv):
    """Mutations tried (benchmarks/mutations.py): attention-not-causal, is_causal=False: fails; gqa-head-order,
    k/v tiled with .repeat (head h reads KV head h % Hkv instead of h // rep): fails."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, hq, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 6, hkv, 8, dtype=torch.float64, generator=g) for _ in range(2))
    got = causal_attention(q, k, v)
    torch.testing.assert_close(got, einsum_attention(q, k, v), rtol=1e-12, atol=1e-12)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_attention_module_equals_reference_in_float64():
    """The model's Attention block (projections, RoPE at an offset, GQA, causal softmax, output projection) in a
    float64 model equals the references built from its weights; the float64 model's RoPE tables are float64.
    Mutation tried: Attention._apply not recomputing the tables (float32 angles cast up): fails (relative error
    up to 5e-7)."""
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=16, n_experts=2, top_k=1, max_seq_len=64)
    attn = build_model(cfg, seed=0).to(torch.float64).layers[0].attention
    assert attn.rope_cos.dtype == torch.float64
    x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b, s, hd = 2, 9, cfg.head_dim
    q = (x @ attn.wq.weight.T).view(b, s, 4, hd)
    k = (x @ attn.wk.weight.T).view(b, s, 2, hd)
    v = (x @ attn.wv.weight.T).view(b, s, 2, hd)
    start = 50  # the KV-cached decoding path calls forward at an offset
    out = einsum_attention(complex_rope(q, start, cfg.rope_theta), complex_rope(k, start, cfg.rope_theta), v)
    want = out.reshape(b, s, -1) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, start_pos=start), want, rtol=1e-11, atol=1e-12)

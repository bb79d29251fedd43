"""Tracing into the IR: leaf ops, symbolic shapes, FLOP and parameter totals against closed forms."""
import pytest
import sympy
import torch
import torch.nn as nn

from meshplan.ir import B, S, TraceError, ops, register_leaf, trace
from meshplan.ir import graph as G
from meshplan.models import build_model, load_config

TABLE = ["internal-352b", "mixtral-8x7b", "mixtral-8x22b", "hunyuan-large", "phi-3.5-moe", "deepseekmoe"]


def closed_form_params(c) -> tuple[int, int]:
    """(total, activated per token) straight from the config."""
    hd = c.head_dim
    attn = c.dim * c.n_heads * hd * 2 + 2 * c.dim * c.n_kv_heads * hd
    shared = 3 * c.dim * c.ffn_dim * c.n_shared_experts
    moe_total = c.dim * c.n_experts + c.n_experts * 3 * c.dim * c.ffn_dim + shared
    moe_active = c.dim * c.n_experts + c.top_k * 3 * c.dim * c.ffn_dim + shared
    dense = 3 * c.dim * c.dense_hidden
    n_moe = c.n_layers - c.n_dense_layers
    common = c.n_layers * (attn + 2 * c.dim) + c.dim + c.vocab_size * c.dim  # norms, final norm, LM head
    total = common + c.vocab_size * c.dim + n_moe * moe_total + c.n_dense_layers * dense
    active = common + c.dim + n_moe * moe_active + c.n_dense_layers * dense  # one embedding row per token
    return total, active


def closed_form_matmul_flops(c) -> sympy.Expr:
    """Forward matmul FLOPs: 2 per activated weight per token, plus causal attention's 2·B·S²·H·hd per layer."""
    _, active = closed_form_params(c)
    matmul_params = active - c.dim - (2 * c.n_layers + 1) * c.dim  # embedding row and norm weights are no matmul
    return 2 * B * S * matmul_params + c.n_layers * 2 * B * S**2 * c.n_heads * c.head_dim


@pytest.mark.parametrize("name", ["tiny", "small"] + TABLE)
def test_totals_match_closed_form(name):
    cfg = load_config(name)
    g = trace(build_model(cfg, device="meta"))
    total, active = closed_form_params(cfg)
    assert g.total_params == total
    assert g.active_params == active
    matmul = sum((op.flops for op in g.ops() if op.kind not in (G.NORM, G.GENERIC)), sympy.Integer(0))
    assert sympy.expand(matmul - closed_form_matmul_flops(cfg)) == 0
    assert g.n_layers() == cfg.n_layers
    kinds = [op.kind for op in g.ops()]
    assert kinds.count(G.ATTENTION) == cfg.n_layers
    assert kinds.count(G.MOE) == cfg.n_layers - cfg.n_dense_layers
    assert kinds.count(G.FFN) == cfg.n_dense_layers


def test_internal_352b_shape():
    g = trace(build_model(load_config("internal-352b"), device="meta"))
    assert g.n_layers() == 60
    assert 330e9 < g.total_params < 360e9 and 30e9 < g.active_params < 40e9
    attn = g.op("layers.59.attention")
    assert attn.attrs == {"dim": 4096, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128}
    assert attn.output.shape == (B, S, 4096) and attn.template == "layers.*.attention"
    moe = g.op("layers.0.feed_forward")
    assert moe.kind == G.MOE and moe.attrs["n_experts"] == 32 and moe.attrs["top_k"] == 3
    assert g.op("output").output.shape == (B, S, 65536)


def test_traced_module_equals_eager():
    torch.manual_seed(0)
    for head in ("lm", "value"):
        m = build_model(load_config("small"), head=head, seed=3)
        g = trace(m)
        for b, s in [(1, 5), (3, 17)]:  # one IR, any batch and sequence
            t = torch.randint(0, m.config.vocab_size, (b, s))
            torch.testing.assert_close(g.module(t), m(t), rtol=0, atol=0)
            assert tuple(g.evaluate(d, b, s) for d in g.op("norm").output.shape) == (b, s, m.config.dim)


def test_generic_ops_get_layer_scoped_names():
    g = trace(build_model(load_config("tiny")))
    adds = [op for op in g.ops() if op.kind == G.GENERIC]
    assert [op.name for op in adds] == ["layers.0.add", "layers.0.add_1", "layers.1.add", "layers.1.add_1"]
    assert adds[0].inputs == ["tok_embeddings", "layers.0.attention"]
    assert adds[0].template == adds[2].template
    assert adds[0].flops == B * S * 64


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.proj(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.block = Gated()

    def forward(self, t):
        return self.block(self.emb(t)) * 2


def test_untraceable_module_names_it():
    with pytest.raises(TraceError, match=r"'block' \(Gated\).*register_leaf"):
        trace(Net())


def test_user_registered_leaf(monkeypatch):
    monkeypatch.setattr(ops, "_REGISTRY", dict(ops._REGISTRY))  # keep the registration local to this test
    register_leaf(Gated, kind="ffn", attrs=lambda m: {"dim": 8, "hidden": 8})
    g = trace(Net())
    block = g.op("block")
    assert block.kind == G.FFN and block.params == 72 and block.output.shape == (B, S, 8)
    mul = [op for op in g.ops() if op.kind == G.GENERIC][0]
    assert mul.inputs == ["block"] and mul.output.shape == (B, S, 8)

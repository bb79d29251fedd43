"""Cost formulas against hand-computed values (docs/reference.md's per-layer volumes) and against the bytes that
a simulated all-to-all actually moves."""
import dataclasses

import numpy as np
import pytest
import sympy

from meshplan.ir import graph as G
from meshplan.ir.placement import Partial, Replicate, Shard
from meshplan.planner import collectives_cost as cc
from meshplan.planner import cost_model as cm
from meshplan.planner import memory
from meshplan.planner.memory import N
from meshplan.planner.pricing import CostModel, MeshConfig, Options

b, s, h, n = 1, 8192, 4096, 8  # internal-352b: m = 4 (32 query heads / 8 KV heads), k = 3 of 32 experts
m_gqa, k = 4, 3
BF16 = 2


def _op(graph, kind):
    return next(graph.ops(kind))


def _sent(kind, x_elems, n=n, local=n, dt_bytes=BF16):
    return float(cc.traffic(kind, x_elems * dt_bytes, n, local).bytes)


def test_v_tp_is_all_gather_plus_reduce_scatter(graph):
    g = graph("internal-352b", n_layers=2)
    attn, norm = _op(g, G.ATTENTION), _op(g, G.NORM)
    assert cm.edge_kinds(norm, "seq", attn, "tp") == ("all_gather", "reduce_scatter")
    add = next(op for op in g.ops(G.GENERIC) if attn.name in op.inputs)
    assert cm.edge_kinds(attn, "tp", add, "seq") == ("reduce_scatter", "all_gather")
    v_tp = 2 * b * s * h * (n - 1) / n * BF16  # docs/reference.md, bytes per GPU per layer (forward)
    assert _sent("all_gather", b * s * h) + _sent("reduce_scatter", b * s * h) == pytest.approx(v_tp)


def test_v_sp_is_half_of_eq2(graph):
    g = graph("internal-352b", n_layers=2)
    t = cm.terms(_op(g, G.ATTENTION), "sp")
    at = {G.B: b, G.S: s, N: n}
    sent = sum(_sent(c.kind, float(c.elems.subs(at))) for c in t.colls)
    ours = b * s * h * (2 + 2 / m_gqa) * (n - 1) / n ** 2 * BF16
    eq2 = 2 * b * s * h * (n - 1) / n * (2 + 2 / m_gqa) / n * BF16
    assert sent == pytest.approx(ours) and sent == pytest.approx(eq2 / 2)


def test_v_ep_and_ratio_to_tp(graph):
    g = graph("internal-352b", n_layers=2)
    t = cm.terms(_op(g, G.MOE), "ep")
    sent = sum(_sent(c.kind, float(c.elems.subs({G.B: b, G.S: s}))) for c in t.colls)
    v_ep = 2 * (k / n) * b * s * h * (n - 1) / n * BF16
    assert sent == pytest.approx(v_ep)
    assert sent / (2 * b * s * h * (n - 1) / n * BF16) == pytest.approx(k / n)


def test_ag_scatter_volume_does_not_grow_with_top_k(custom_graph):
    vols = []
    for top_k in (2, 8):
        g = custom_graph(dim=256, n_heads=4, n_kv_heads=4, ffn_dim=128, n_experts=8, top_k=top_k, n_layers=1,
                         vocab_size=64, max_seq_len=64)
        moe, norm = _op(g, G.MOE), _op(g, G.NORM)
        assert cm.terms(moe, "ag_scatter").colls == ()
        fwd, bwd = cm.edge_kinds(norm, "seq", moe, "ag_scatter")
        vols.append(_sent(fwd, 64 * 256) + _sent(bwd, 64 * 256))
        if top_k == 8:  # V_EP / V_TP = k/n = 1: EP moves as much as AG + RS
            ep = sum(_sent(c.kind, float(c.elems.subs({G.B: 1, G.S: 64}))) for c in cm.terms(moe, "ep").colls)
            assert ep == pytest.approx(vols[-1])
    assert vols[0] == vols[1] == pytest.approx(2 * 64 * 256 * (n - 1) / n * BF16)


def _ulysses_sent(bsz, seq, hq, hkv, hd, n):
    """Elements one rank sends in the qkv all-to-all, by slicing real arrays: rank r holds [b, s/n, heads, hd]
    for q, k, v and sends rank j the heads j computes (KV heads replicated when there are fewer than n)."""
    q = np.zeros((bsz, seq // n, hq, hd))
    kv = np.zeros((2, bsz, seq // n, hkv, hd))
    r, sent = 0, 0
    for j in range(n):
        if j == r:
            continue
        sent += q[:, :, j * hq // n:(j + 1) * hq // n].size
        if hkv >= n:
            sent += kv[:, :, :, j * hkv // n:(j + 1) * hkv // n].size
        else:
            sent += kv[:, :, :, j * hkv // n].size
    return sent


@pytest.mark.parametrize("hq, hkv, nn", [(8, 4, 4), (8, 2, 4), (16, 16, 8), (8, 1, 2)])
def test_ulysses_volume_matches_bytes_moved(custom_graph, hq, hkv, nn):
    hd = 8
    g = custom_graph(dim=hq * hd, n_heads=hq, n_kv_heads=hkv, ffn_dim=32, n_experts=4, top_k=1, n_layers=1,
                     vocab_size=64, max_seq_len=64)
    qkv = cm.terms(_op(g, G.ATTENTION), "sp").colls[0]
    x = float(qkv.elems.subs({G.B: 2, G.S: 32, N: nn}))
    assert _sent("all_to_all", x, n=nn, local=nn, dt_bytes=1) == _ulysses_sent(2, 32, hq, hkv, hd, nn)


def test_ep_volume_matches_tokens_moved():
    """Balanced top-k routing: count (token, expert) pairs whose expert lives on another rank."""
    n_, experts, top_k, tokens, dim = 4, 8, 2, 64, 16
    local = tokens // n_
    sent = 0
    for t in range(local):  # rank 0's tokens
        for j in range(top_k):
            expert = (t * top_k + j) % experts
            sent += dim if expert // (experts // n_) != 0 else 0
    assert sent == _sent("all_to_all", top_k * tokens * dim, n=n_, local=n_, dt_bytes=1)


def test_sp_gradients_cross_nodes_like_tp():
    """docs/reference.md: replicated SP weights reduce over n·d ranks hierarchically, same inter-node volume as TP:
    2·P/n·(d-1)/d."""
    p_bytes, d = 1e9, 6
    t = cc.traffic("all_reduce", p_bytes, n * d, n)
    assert t.inter_bytes == pytest.approx(2 * p_bytes / n * (d - 1) / d)
    assert t.intra_bytes == pytest.approx(2 * p_bytes * (n - 1) / n)
    assert cc.traffic("all_reduce", p_bytes / n, d, 1).inter_bytes == pytest.approx(t.inter_bytes)


def test_bf16_gradient_reduction_is_the_runtimes_two_level_all_to_all_and_all_gather(graph, h800):
    """runtime/data_parallel.py reduces bf16 gradients axis by axis: an all-to-all of bf16 shards (float32 sums)
    then an all-gather, inside the node first and across nodes on the 1/n left; plus one cast each way. Priced
    exactly so, it halves the inter-node bytes of the fp32 all-reduce, and its cost is those collectives' times."""
    g = graph("internal-352b", n_layers=2)
    cmodel = CostModel(g, h800, Options(seq=s, zero=False))  # without ZeRO: the runtime's reduction
    d, p = 12, 1e8  # replicated parameters reduced over n·d = 96 ranks, 8 per node
    mc = MeshConfig(n, d, 1, b, 1)

    def t(kind, x, ranks, local):
        return cc.comm_time(kind, cc.traffic(kind, x, ranks, local), h800)

    want = (t("all_to_all", n * p * 2, n, n) + t("all_gather", p * 2, n, n)
            + t("all_to_all", d * p / n * 2, d, 1) + t("all_gather", p / n * 2, d, 1)
            + 2 * p * (4 + 2) / (3.35e12 * 0.9))
    assert cmodel.grad_time(0, p, mc, "bf16") == pytest.approx(want)
    assert cmodel.grad_time(0, p, mc, "fp32") == pytest.approx(t("all_reduce", p * 4, n * d, n))
    inter_bf16 = cc.traffic("all_to_all", d * p / n * 2, d, 1).inter_bytes + \
        cc.traffic("all_gather", p / n * 2, d, 1).inter_bytes
    assert inter_bf16 == pytest.approx(cc.traffic("all_reduce", p * 4, n * d, n).inter_bytes / 2)
    assert cmodel.grad_time(0, p, mc, "bf16") < cmodel.grad_time(0, p, mc, "fp32")  # on H800 bf16 pays


def test_distributed_optimizer_reduce_scatters_grads_and_gathers_bf16_params(graph, h800):
    """With ZeRO-1 (Megatron's distributed optimizer) the fp32 gradients are reduce-scattered (4 B/param) and the
    updated bf16 parameters all-gathered (2 B/param) -- not an 8 B all-reduce; bf16 grads: the all-to-all only."""
    g = graph("internal-352b", n_layers=2)
    cmodel = CostModel(g, h800, Options(seq=s))
    d, p = 12, 1e8
    mc = MeshConfig(n, d, 1, b, 1)

    def t(kind, x, ranks, local):
        return cc.comm_time(kind, cc.traffic(kind, x, ranks, local), h800)

    assert cmodel.grad_time(0, p, mc, "fp32") == pytest.approx(t("reduce_scatter", p * 4, n * d, n))
    assert cmodel.gather_time(0, p, mc) == pytest.approx(t("all_gather", p * 2, n * d, n))
    bf16 = t("all_to_all", n * p * 2, n, n) + t("all_to_all", d * p / n * 2, d, 1) + 2 * p * (4 + 2) / (3.35e12 * 0.9)
    assert cmodel.grad_time(0, p, mc, "bf16") == pytest.approx(bf16)
    ch = cmodel.choice(cmodel.group_of[_op(g, G.ATTENTION).name], "sp", mc)
    assert ch.gather > 0
    for name in ("qkv_a2a", "out_a2a"):  # meshplan's runtime overlaps uncompressed all-to-alls only
        assert 0 <= ch.floors[name]["fp32"] < ch.colls[name]["fp32"]
        assert ch.floors[name]["bf16"] == ch.colls[name]["bf16"]


def test_alpha_beta_time(h800):
    t = cc.traffic("all_gather", 1e8, 8, 8)
    expected = 7 * 3e-6 + 1e8 * 7 / 8 / (200e9 * 0.8)  # per-direction NVLink x the link's ring efficiency
    assert cc.comm_time("all_gather", t, h800) == pytest.approx(expected)
    inter = cc.traffic("all_gather", 1e8, 16, 8)  # two nodes: intra ring, then 2-node ring on 1/8 of the data
    expected = 7 * 3e-6 + 1e8 * 7 / 8 / (200e9 * 0.8) + 1 * 10e-6 + 1e8 / 8 / 2 / (50e9 * 0.85)
    assert cc.comm_time("all_gather", inter, h800) == pytest.approx(expected)


def test_precision_bytes_and_errors():
    assert cc.wire_bytes(1000, 10, "fp32") == 4000 and cc.wire_bytes(1000, 10, "bf16") == 2000
    assert cc.wire_bytes(1000, 10, "fp8") == 1000 + 4 * 10  # per-token fp32 scales
    # the measured model (configs/error_model.yaml): below the unit roundoff, and an FP8 all-to-all + FP32 local
    # sum rounds each summand once, so a reduction's error does not grow like sqrt(n)
    assert cc.relative_error("all_to_all", "fp32", 8) == 0
    assert 2 ** -10 < cc.relative_error("all_to_all", "bf16", 8) < 2 ** -8
    assert 2 ** -6 < cc.relative_error("reduce_scatter", "fp8", 8) < 2 ** -4
    assert cc.relative_error("reduce_scatter", "bf16", 16) < 1.5 * cc.relative_error("reduce_scatter", "bf16", 2)
    assert 0 < cc.grad_relative_error("bf16", 8) < 2 * 2 ** -8


@pytest.mark.parametrize("act", ["bf16", "fp32"])
def test_compressed_collectives_pay_encode_and_decode(graph, h800, act):
    """EP dispatch of k·b·s tokens: each precision's time is the all-to-all of its wire bytes plus, unless it is the
    activations' own dtype, the encode + decode of this rank's X/n rows out and X/n rows in, as HBM traffic at the
    cluster's codec efficiency (0.9 for h800)."""
    g = graph("internal-352b", n_layers=2)
    cmodel = CostModel(g, h800, Options(seq=s, activation_dtype=act, balanced_routing=True))  # mean rows (no imbalance)
    moe = cmodel.group_of[_op(g, G.MOE).name]
    ch = cmodel.choice(moe, "ep", MeshConfig(n, 1, 1, b, 1))
    rows = k * b * s
    elems = rows * h
    for dt in ("fp32", "bf16", "fp8"):
        comm = cc.comm_time("all_to_all", cc.traffic("all_to_all", cc.wire_bytes(elems, rows, dt), n, n), h800)
        codec = 0.0 if dt == act else \
            (2 / n) * (elems * cc.PRECISION_BYTES[act] + cc.wire_bytes(elems, rows, dt)) / (3.35e12 * 0.9)
        assert ch.colls["dispatch"][dt] == pytest.approx(2 * (comm + codec))  # forward + backward
    # on H800 the bytes saved outweigh the conversion, from either activation dtype: fewer bytes, less time
    assert ch.colls["dispatch"]["fp8"] < ch.colls["dispatch"]["bf16"] < ch.colls["dispatch"]["fp32"]


def test_slow_codecs_keep_the_activations_dtype(graph, h800):
    """Where conversion is slow (this CPU's torch fp8 path reaches ~5% of copy bandwidth), the ILP keeps every
    activation collective in the activations' dtype, even with an unlimited error budget."""
    import dataclasses

    from meshplan.planner import ilp

    g = graph("internal-352b", n_layers=2)
    mc = MeshConfig(n, 1, 1, b, 1)

    def activation_precisions(cluster):
        a = ilp.solve(CostModel(g, cluster, Options(seq=s, error_budget=None)).problem(mc))[0]
        return {dt for (_, coll), dt in a.precision.items() if coll != "grad"}

    assert "fp8" in activation_precisions(h800)
    slow = dataclasses.replace(h800, codec_efficiency={"fp32": 1e-4, "bf16": 1e-4, "fp8": 1e-4})
    assert activation_precisions(slow) == {"bf16"}


def test_compute_time_of_ep_moe_without_kernel_model(graph, h800):
    """CPU-style clusters (no kernels: section) keep the smooth size efficiency prod x / (x + c)."""
    smooth = dataclasses.replace(h800, kernels=None)
    g = graph("internal-352b", n_layers=2)
    cmodel = CostModel(g, smooth, Options(seq=s))
    mc = MeshConfig(n, 1, 1, b, 1)
    moe_group = cmodel.group_of[_op(g, G.MOE).name]
    ch = cmodel.choice(moe_group, "ep", mc)
    t = b * s
    flops = 2 * t * h * 32 + k * 6 * t * h * 14336  # router + top-k SwiGLU experts (ops.py)
    eff = 1.0
    for x in (k * t / 32, h, 14336):  # tokens per expert, model dim, expert hidden
        eff *= x / (x + 64)
    hbm = float(cm.terms(_op(g, G.MOE), "ep").hbm_bytes.subs({G.B: b, G.S: s, N: n}))
    assert ch.compute == pytest.approx(3 * flops / n / (989e12 * 0.75 * eff) + 3 * hbm / smooth.hbm_bandwidth)


def test_memory_of_sp_attention(graph, h800):
    g = graph("internal-352b", n_layers=2)
    attn = _op(g, G.ATTENTION)
    p = 4096 * (4096 + 1024 + 1024 + 4096)
    assert attn.params == p
    split, rep = memory.param_split(attn, "sp")
    assert split == 0 and rep == p
    d = 12
    assert memory.static_bytes(0, p, n, d) == pytest.approx(6 * p + 12 * p / (n * d))
    split, rep = memory.param_split(attn, "tp")
    assert float(split.subs(N, n)) == pytest.approx(p / n) and sympy.sympify(rep).subs(N, n) == 0
    # sp keeps input, q, core output and wo input at 1/n plus k, v head-sharded; lse fp32 per head
    act = float(memory.activation_bytes(attn, "sp").subs({G.B: b, G.S: s, N: n}))
    t = b * s
    assert act == pytest.approx(2 * (t / n * 4096 + 3 * t * 4096 / n + t * 2048 / n) + 4 * t * 32 / n)


def test_edge_kinds_follow_transition():
    from meshplan.ir import trace
    from meshplan.models import build_model, load_config

    graph = trace(build_model(load_config("tiny")))
    attn, norm, moe = (next(op for op in graph.ops() if op.kind == k) for k in (G.ATTENTION, G.NORM, G.MOE))
    assert cm.placements(attn, "tp") == (Replicate(), Partial())
    assert cm.edge_kinds(norm, "replicate", attn, "sp") == ("slice", "all_gather")
    assert cm.edge_kinds(norm, "seq", moe, "ep") == ("none", "none")
    assert cm.edge_kinds(attn, "tp", norm, "replicate") == ("all_reduce", "none")
    assert cm.edge_kinds(norm, "seq", attn, "dp") == ("all_to_all", "all_to_all")
    assert cm.placements(attn, "dp") == (Shard(0), Shard(0))


def test_symbolic_compute_matches_numeric(graph, h800):
    h800 = dataclasses.replace(h800, kernels=None)  # the symbolic form is the smooth model's
    g = graph("internal-352b", n_layers=2)
    t = cm.terms(_op(g, G.MOE), "tp")
    expr = cm.compute_time_expr(t, h800)
    at = {G.B: 2, G.S: 4096, N: 4}
    num = cm.compute_time(float(t.flops.subs(at)), float(t.hbm_bytes.subs(at)),
                          [float(sympy.sympify(x).subs(at)) for x in t.gemm_dims], h800)
    assert float(expr.subs(at)) == pytest.approx(num)

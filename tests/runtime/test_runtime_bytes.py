"""comm_stats against closed forms (measure/volumes.py, from docs/reference.md's shapes): what each rank sends per step.

Tiny model, sequence-parallel norms and residuals, so attention and FFN traffic is exactly their op's own
collectives plus the edges in and out of them. EP with uneven routing is checked against the routed token counts
of the single-device model, rank by rank.
"""
import pytest
import torch
from rt_harness import uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.measure.volumes import (
    attention_bytes,
    ep_counts_bytes,
    measure_bytes,
    moe_ep_bytes,
    moe_tp_bytes,
    routed_rows,
    split_bytes,
)
from meshplan.models import build_model, load_config
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.comm_stats import BWD, FWD

B, S = 4, 16


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    return cfg, trace(build_model(cfg)), tokens


def _step(cfg, graph, tokens, plan):
    world = LocalWorld(plan.mesh.size)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(build_model(cfg), plan, graph=graph, groups=groups[r])
        pm(tokens).pow(2).mean().backward()
        pm.reduce_gradients()
        return pm

    return world.run(rank)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("attention,moe", [("sp", "ep"), ("sp", "tp"), ("tp", "ep"), ("tp", "tp")])
def test_bytes_per_rank_match_closed_forms(tiny, n, attention, moe):
    cfg, graph, tokens = tiny
    plan = uniform_plan(graph, Mesh.of(mp=n), {"attention": attention, "moe": moe})
    rows = routed_rows(build_model(cfg), tokens, n)
    for r, pm in enumerate(_step(cfg, graph, tokens, plan)):
        stats = pm.comm_stats
        for phase in (FWD, BWD):
            parts = split_bytes(stats, phases=(phase,))
            assert parts["attention"] == cfg.n_layers * attention_bytes(attention, cfg, B, S, n), (r, phase)
            if moe == "tp":
                assert parts["ffn"] == cfg.n_layers * moe_tp_bytes(cfg, B, S, n)
            else:  # uneven: what this rank actually routes off-rank and receives, per layer
                counts = ep_counts_bytes(cfg, n) if phase == FWD else 0
                assert parts["ffn"] == sum(moe_ep_bytes(*layer[r], cfg) + counts for layer in rows), (r, phase)
            # the logits gathered to every rank ([B, S/n, V] from each) and the backward's reduce-scatter
            assert parts["other"] == (n - 1) * B * (S // n) * cfg.vocab_size * 4
        # gradient reduction: one fp32 all-reduce over the model axis of every replicated parameter
        replicated = sum(p.to_local().numel() for name, p in pm.named_parameters()
                         if all(str(pl) == "R" for pl in pm.placement_of(name)))
        assert split_bytes(stats)["grads"] == pytest.approx(2 * (n - 1) / n * replicated * 4, abs=8)


def test_sp_vs_tp_and_ep_vs_tp_ratios(tiny):
    """docs/reference.md: V_SP/V_TP = (2 + 2/m)/(2n) counting sends (m = 2 here, KV heads split at n = 2), and
    V_EP/V_TP = k/n (plus the token counts, and up to the routing's unevenness)."""
    cfg, _, _ = tiny
    got = measure_bytes(cfg, n=2, batch=B, seq=S)
    for key, v in got.items():
        assert v["measured"]["attention"] == v["formula"]["attention"], key
        assert v["measured"]["ffn"] == v["formula"]["ffn"], key
    m, n, k = cfg.gqa_ratio, 2, cfg.top_k
    assert got["sp/tp"]["measured"]["attention"] / got["tp/tp"]["measured"]["attention"] == (2 + 2 / m) / (2 * n)
    assert got["tp/ep"]["measured"]["ffn"] / got["tp/tp"]["measured"]["ffn"] == pytest.approx(k / n, rel=0.1)


def test_bf16_gradients_halve_the_reduce_scatter(tiny):
    cfg, graph, tokens = tiny
    mesh = Mesh.of(mp=2)
    fp32 = _step(cfg, graph, tokens, uniform_plan(graph, mesh, {"attention": "sp", "moe": "ep"}))[0]
    bf16 = _step(cfg, graph, tokens, uniform_plan(graph, mesh, {"attention": "sp", "moe": "ep"},
                                                  precision={"grad": "bf16"}))[0]
    g32, g16 = split_bytes(fp32.comm_stats)["grads"], split_bytes(bf16.comm_stats)["grads"]
    # fp32 all-reduce = reduce-scatter + all-gather, each N/2; bf16: a bf16 all-to-all and a bf16 all-gather
    # (data_parallel.py: the reduced shard is cast once and gathered in bf16), so half of it (+ padding)
    assert g16 == pytest.approx(0.5 * g32, rel=0.01)
    assert bf16.comm_stats.total(kind="all_to_all", phase="grad") > 0


@pytest.mark.parametrize("bucket_mb", [25.0, 0.01])
def test_hierarchical_bucketed_gradient_reduction(tiny, bucket_mb):
    """Parameters replicated on both axes of (dp=2, mp=2): reduce-scatter on mp (intra), all-reduce of the half on
    dp (inter), all-gather on mp; the inter axis carries N/2 per rank instead of N. Small buckets: more calls,
    the same bytes (up to padding) and the same gradients."""
    cfg, graph, tokens = tiny
    mesh = Mesh.of(dp=2, mp=2)
    plan = uniform_plan(graph, mesh, {"attention": "sp", "moe": "ep"})
    world = LocalWorld(4)
    groups = world.groups(mesh)

    def rank(r):
        pm = ParallelModel(build_model(cfg), plan, graph=graph, groups=groups[r], bucket_mb=bucket_mb)
        pm(tokens).pow(2).mean().backward()
        pm.reduce_gradients()
        layouts = {name: tuple(str(pl) for pl in pm.placement_of(name)) for name, _ in pm.named_parameters()}
        both = sum(p.to_local().numel() * 4 for name, p in pm.named_parameters() if layouts[name] == ("R", "R"))
        dp_only = sum(p.to_local().numel() * 4 for name, p in pm.named_parameters() if layouts[name] != ("R", "R"))
        return pm.comm_stats, both, dp_only, pm.full_grads()

    results = world.run(rank)
    stats, both, dp_only, _ = results[0]
    assert dp_only > 0  # the experts: split on mp, replicated on dp
    by = {}
    for k, v in stats.bytes.items():
        if k.phase == "grad":
            by[k.kind, k.axis] = by.get((k.kind, k.axis), 0) + v
    calls = stats.n_calls(phase="grad", kind="reduce_scatter")
    assert set(by) == {("reduce_scatter", "mp"), ("all_reduce", "dp"), ("all_gather", "mp")}
    assert by[("reduce_scatter", "mp")] == pytest.approx(both / 2, abs=64)
    assert by[("all_gather", "mp")] == pytest.approx(both / 2, abs=64)
    # 2·(d-1)/d of the N/2 shard, and a plain all-reduce of the experts (replicated on dp only)
    assert by[("all_reduce", "dp")] == pytest.approx(both / 2 + dp_only, abs=64)
    if bucket_mb < 1:
        assert calls > 5
        ref = build_model(cfg)
        ref(tokens).pow(2).mean().backward()
        for name, p in ref.named_parameters():
            assert torch.allclose(results[0][3][name], p.grad, rtol=1e-5, atol=1e-7), name

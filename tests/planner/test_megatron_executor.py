"""Plans priced as Megatron-Core executes them (MeshConfig.megatron, planner/plan_settings.py): its grouped experts
keep no copy of the expert outputs (the routing weights act inside the SwiGLU) and, with FP8 GEMMs, keep the fc1 and
fc2 inputs in FP8; its full recompute keeps only each transformer layer's input."""
import dataclasses

import pytest

from meshplan.ir import graph as G
from meshplan.planner import MeshConfig, Options
from meshplan.planner.baselines import folded_plan
from meshplan.planner.plans import price_plan

SEQ = 4096


@pytest.fixture(scope="module")
def model(graph):
    return graph("mixtral-8x7b", n_layers=4)


def _acts(g, cluster, mc, opts):
    """Priced plan and {op kind or name: activation bytes of its chosen strategy} for one op per group."""
    priced = price_plan(g, cluster, folded_plan(g, mc), mc.d * mc.b * mc.m, opts)
    out = {}
    for name, grp in priced.problem.groups.items():
        op = priced.cost_model.groups[name].ops[0]
        out[op.name.split(".")[-1]] = grp.choices[priced.assignment.strategy[name]].act_mem
    return priced, out


@pytest.mark.parametrize("dtype, selective", [("bf16", False), ("fp8", False), ("fp8", True)])
def test_megatron_experts_keep_less_by_exactly_the_combine_copy_and_fp8_inputs(model, h100, dtype, selective):
    opts = Options(seq=SEQ, balanced_routing=True, gemm_dtype=dtype)
    mc = MeshConfig(8, 1, 2, 8, 4, selective=selective, fold=1)
    own, acts = _acts(model, h100, mc, opts)
    meg, megacts = _acts(model, h100, dataclasses.replace(mc, megatron=True), opts)
    a = next(op for op in model.ops() if op.kind == G.MOE).attrs
    rows = a["top_k"] * 8 * SEQ / 8  # routed copies on one of 8 EP ranks
    saved = 2 * rows * a["dim"]  # the expert outputs meshplan's combine keeps for the weights' gradient
    if dtype == "fp8":  # fc1 input, and fc2 input unless selective recompute dropped it, at 1 B instead of 2
        saved += rows * (a["dim"] + (0 if selective else a["ffn_dim"]))
    assert acts["feed_forward"] - megacts["feed_forward"] == pytest.approx(saved)
    assert {k: v for k, v in acts.items() if k != "feed_forward"} == pytest.approx(
        {k: v for k, v in megacts.items() if k != "feed_forward"})
    assert meg.breakdown.step == pytest.approx(own.breakdown.step)  # a memory difference only
    assert max(meg.breakdown.memory) < max(own.breakdown.memory)


def test_megatron_full_recompute_keeps_each_layer_input_only(model, h100):
    opts = Options(seq=SEQ, balanced_routing=True)
    mc = MeshConfig(8, 1, 2, 8, 4, recompute=True, fold=1)
    own, acts = _acts(model, h100, mc, opts)
    meg, megacts = _acts(model, h100, dataclasses.replace(mc, megatron=True), opts)
    assert megacts["attention_norm"] == acts["attention_norm"] > 0  # the layer input, as this rank holds it
    for name in ("attention", "add", "ffn_norm", "feed_forward", "add_1"):
        assert megacts[name] == 0 < acts[name]
    _, plain = _acts(model, h100, dataclasses.replace(mc, recompute=False), opts)
    assert megacts["output"] == plain["output"] > acts["output"]  # the LM head is outside the layers: not rerun
    assert meg.breakdown.step == pytest.approx(own.breakdown.step)
    assert max(meg.breakdown.memory) < max(own.breakdown.memory)

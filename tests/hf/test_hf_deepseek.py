"""DeepSeek-V3: MLA (replicate, head-split tp, Ulysses sp), a dense first layer, grouped sigmoid routing with the
score-correction bias and routed scaling, an ungated shared expert — equal to HF's own model."""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_harness import auto_plan, forced_plan, run_threads  # noqa: E402
from hf_models import batch, hf_model  # noqa: E402
from test_hf_parallel import PLANNED  # noqa: E402

from meshplan.hf import adapt  # noqa: E402
from meshplan.ir import Mesh, Plan, trace  # noqa: E402

VARIANTS = [{}, {"q_lora_rank": 12}, {"rope_interleave": False}]


@pytest.mark.parametrize("over", VARIANTS, ids=["kv-lora", "q-lora", "rotate-half"])
def test_forward_equals_hf(over):
    model = hf_model("deepseek_v3", **over)
    tokens = batch()[0]
    torch.testing.assert_close(adapt(model)(tokens), model(tokens, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_structure_reaches_the_ir():
    ops = {op.name: op for op in trace(adapt(hf_model("deepseek_v3"))).ops()}
    assert ops["layers.0.feed_forward"].kind == "ffn" and ops["layers.1.feed_forward"].kind == "moe"
    moe = ops["layers.1.feed_forward"].attrs
    assert (moe["scoring"], moe["n_group"], moe["topk_group"], moe["routed_scale"]) == ("sigmoid", 2, 1, 2.5)
    assert moe["score_bias"] and moe["router_fp32"] and moe["shared_hidden"] == 16
    assert ops["layers.0.attention"].attrs["mla"] and ops["layers.0.attention"].strategies is None


@pytest.mark.parametrize("strategies, over", [
    ({"attention": "sp", "moe": "ep"}, {}), ({"attention": "sp", "moe": "ep"}, {"q_lora_rank": 12}),
    ({"attention": "sp", "moe": "tp"}, {}), ({"attention": "sp", "moe": "ag_scatter"}, {"rope_interleave": False}),
    ({"attention": "tp", "moe": "ep"}, {}), ({"attention": "tp", "moe": "tp"}, {"q_lora_rank": 12}),
    ({"attention": "replicate", "moe": "ag_scatter"}, {}), ({"attention": "tp", "moe": "ag_scatter"}, {}),
])
def test_two_ranks_equal_hf(strategies, over):
    graph, plan = forced_plan("deepseek_v3", strategies, **over)
    assert run_threads("deepseek_v3", graph, plan, **over) == []


@pytest.mark.parametrize("strategies, mesh", [
    ({"attention": "sp", "moe": "ep"}, Mesh.of(mp=4)), ({"attention": "tp", "moe": "ep"}, Mesh.of(dp=2, mp=2)),
])
def test_four_ranks_equal_hf(strategies, mesh):
    graph, _ = forced_plan("deepseek_v3", strategies)
    assert run_threads("deepseek_v3", graph, Plan.build(graph, mesh, strategies)) == []


def test_emitted_overlap_code_equals_hf():
    """codegen's chunked Ulysses phases carry MLA's q, k and v (two head dims) in one buffer."""
    graph, plan = forced_plan("deepseek_v3", {"attention": "sp", "moe": "ep"})
    assert run_threads("deepseek_v3", graph, plan, overlap_chunks=2) == []


@pytest.mark.parametrize("setting", PLANNED)
def test_auto_plan_equals_hf(setting):
    graph, plan = auto_plan("deepseek_v3", **PLANNED[setting])
    assert run_threads("deepseek_v3", graph, plan) == []


def test_any_strategy_on_a_one_rank_axis_is_the_whole_op():
    """Plan.validate accepts any strategy on a 1-rank model axis (nothing is split): MLA runs whole there."""
    graph, _ = forced_plan("deepseek_v3", {})
    for attention in ("sp", "tp"):
        plan = Plan.build(graph, Mesh.of(dp=2, mp=1), {"attention": attention, "moe": "ep"})
        assert run_threads("deepseek_v3", graph, plan) == []

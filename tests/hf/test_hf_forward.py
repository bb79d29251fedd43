"""Each supported HF family's front door computes HF's own forward, over HF's own parameters."""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_models import FAMILIES, batch, hf_model, loss_of  # noqa: E402

import meshplan  # noqa: E402
from meshplan.hf import HFConfigError, adapt  # noqa: E402
from meshplan.ir import PlanError  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_forward_and_grads_equal_hf(family):
    model = hf_model(family)
    tokens, targets = batch()
    ref = model(tokens, use_cache=False).logits
    cm = meshplan.compile(model, cluster="local", world_size=1, example_inputs=(tokens,))
    out = cm(tokens)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # gradients land in the HF model's own .grad (the front door's parameters are HF's)
    loss_of(out, targets).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss_of(model(tokens, use_cache=False).logits, targets).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_parameters_are_shared_not_copied():
    model = hf_model("qwen2_moe")
    front = adapt(model)
    hf = dict(model.named_parameters())
    for name, p in front.named_parameters():
        assert p is hf[front.hf_names[name]]
    assert set(front.hf_names.values()) == set(hf)


def test_variants_reach_the_ir():
    ops = {op.name: op for op in meshplan.ir.trace(adapt(hf_model("qwen2_moe"))).ops()}
    attn, moe = ops["layers.0.attention"].attrs, ops["layers.0.feed_forward"].attrs
    assert attn["rope"] == "half" and attn["qkv_bias"] and attn.get("qk_norm", "none") == "none"
    assert moe["shared_gate"] and moe["fused_experts"] and moe["shared_hidden"] == 24
    olmoe = {op.name: op for op in meshplan.ir.trace(adapt(hf_model("olmoe"))).ops()}
    assert olmoe["layers.0.attention"].attrs["qk_norm"] == "proj"
    assert olmoe["layers.0.attention"].strategies == ("sp", "replicate")


def test_olmoe_refuses_head_split_tp_at_compile_time():
    with pytest.raises(PlanError, match="layers.0.attention.*allowed: sp, replicate"):
        meshplan.compile(hf_model("olmoe"), world_size=2, strategies={"attention": "tp"},
                         example_inputs=(batch()[0],))


@pytest.mark.parametrize("family, attr, value", [
    ("mixtral", "sliding_window", 16), ("llama", "hidden_act", "gelu"), ("olmoe", "clip_qkv", 8.0),
    ("llama", "attention_dropout", 0.1), ("llama", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 10000.0}),
    ("qwen2_moe", "use_sliding_window", True), ("mixtral", "router_jitter_noise", 0.1),
])
def test_unsupported_attribute_is_a_one_line_error_naming_it(family, attr, value):
    over = {attr: value, **({"sliding_window": 8} if attr == "use_sliding_window" else {})}
    with pytest.raises(HFConfigError) as e:
        adapt(hf_model(family, **over))
    msg = str(e.value)
    named = {"rope_parameters": "rope_type", "use_sliding_window": "layer_types"}.get(attr, attr)
    assert "\n" not in msg and f".{named}=" in msg


def test_unknown_model_type_is_refused():
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(HFConfigError, match="model_type='gpt2' has no meshplan adapter"):
        meshplan.compile(model, world_size=1)


def test_compile_strategies_are_validated():
    tokens = (batch()[0],)
    with pytest.raises(PlanError, match="'atention' is not an op kind"):
        meshplan.compile(hf_model("llama"), world_size=2, strategies={"atention": "sp"}, example_inputs=tokens)
    with pytest.raises(PlanError, match="'ep' is not a attention strategy"):
        meshplan.compile(hf_model("llama"), world_size=2, strategies={"attention": "ep"}, example_inputs=tokens)
    cm = meshplan.compile(hf_model("mixtral"), world_size=2, strategies={"attention": "sp", "moe": "ep"},
                          example_inputs=tokens)
    kinds = {op.name: op.kind for op in cm.graph.ops()}
    assert {p.strategy for n, p in cm.plan.ops.items() if kinds[n] == "moe"} == {"ep"}
    assert {p.strategy for n, p in cm.plan.ops.items() if kinds[n] == "attention"} == {"sp"}


def test_compile_cache_tells_variants_apart():
    """Two models of one structure but different routing must not share a cached graph (its attrs drive every
    strategy): DeepSeek-V3 with routed_scaling_factor 2.5, then 1.0."""
    tokens = (batch()[0],)
    graphs = [meshplan.compile(hf_model("deepseek_v3", routed_scaling_factor=f), world_size=2, example_inputs=tokens,
                               strategies={"attention": "tp", "moe": "ep"}).graph for f in (2.5, 1.0)]
    scales = [g.op("layers.1.feed_forward").attrs["routed_scale"] for g in graphs]
    assert scales == [2.5, 1.0]


def test_dense_layers_where_the_config_says():
    """mlp_only_layers / decoder_sparse_step: the HF layer's own block decides, and the front door follows."""
    model = hf_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[0], decoder_sparse_step=1)
    kinds = [op.kind for op in meshplan.ir.trace(adapt(model)).ops() if op.name.endswith("feed_forward")]
    assert kinds == ["ffn", "moe", "moe"]
    tokens = batch()[0]
    torch.testing.assert_close(adapt(model)(tokens), model(tokens, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_a_parameter_the_adapter_does_not_use_is_refused():
    """The safety net behind the config checks: an HF parameter no meshplan block reads (a variant the adapter
    does not know) is an error naming it, never dropped."""
    model = hf_model("llama")
    model.model.layers[1].self_attn.register_parameter("sinks", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(HFConfigError, match=r"model\.layers\.1\.self_attn\.sinks"):
        adapt(model)

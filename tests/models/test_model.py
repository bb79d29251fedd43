"""The reference model: config validation, and properties any MoE implementation must have."""
import pytest
import torch

from meshplan.models import ConfigError, ModelConfig, build_model, load_config
from meshplan.models.moe_transformer import MoE, keep_mask, route

TABLE = ["tiny", "small", "internal-352b", "mixtral-8x7b", "mixtral-8x22b", "hunyuan-large", "phi-3.5-moe",
         "deepseekmoe"]


@pytest.mark.parametrize("name", TABLE)
def test_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.n_heads % cfg.n_kv_heads == 0


@pytest.mark.parametrize("field,value,needle", [
    ("n_heads", 5, "model.dim"), ("n_kv_heads", 3, "model.n_kv_heads"), ("top_k", 9, "model.top_k"),
    ("vocab_size", 0, "model.vocab_size"), ("capacity_factor", -1.0, "model.capacity_factor"),
])
def test_bad_config_names_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        ModelConfig(**{field: value})


def test_unknown_yaml_field(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\ndim: 64\nn_layer: 3\n")
    with pytest.raises(ConfigError, match=r"model\.n_layer: unknown field"):
        ModelConfig.from_yaml(p)


def test_moe_matches_dense_loop_over_tokens():
    """The vectorised dropless MoE equals routing each token by hand through its top-k experts."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, n_experts=5, top_k=3, n_shared_experts=1)
    moe = build_model(cfg).layers[0].feed_forward
    assert isinstance(moe, MoE)
    x = torch.randn(2, 7, 32)
    out = moe(x)
    xt = x.reshape(-1, 32)
    w, idx = route(moe.gate(xt), 3, True)
    expected = torch.stack([sum(w[t, j] * moe.experts.expert(int(idx[t, j]), xt[t:t + 1])[0] for j in range(3))
                            for t in range(xt.shape[0])]) + moe.shared(xt)
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)


def test_capacity_keeps_first_tokens_per_expert():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]])
    keep = keep_mask(idx, 3, capacity=2)
    # expert 0 is chosen by tokens 0, 1, 2, 3: only the first two keep it
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_value_head_and_causality():
    cfg = load_config("tiny")
    critic = build_model(cfg, head="value")
    t = torch.randint(0, cfg.vocab_size, (2, 10))
    v = critic(t)
    assert v.shape == (2, 10)
    t2 = t.clone()
    t2[:, 6:] = (t2[:, 6:] + 1) % cfg.vocab_size  # changing later tokens must not change earlier outputs
    torch.testing.assert_close(critic(t2)[:, :6], v[:, :6])


def test_meta_device_builds_big_model_without_memory():
    m = build_model(load_config("internal-352b"), device="meta")
    assert all(p.is_meta for p in m.parameters())


def test_yaml_exponent_floats(tmp_path):
    p = tmp_path / "m.yaml"
    tiny = load_config("tiny").to_dict()
    required = "".join(f"{k}: {tiny[k]}\n" for k in ("name", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                                   "ffn_dim", "n_experts", "top_k", "max_seq_len"))
    p.write_text(required + "norm_eps: 1e-6\nrope_theta: 5e5\n")  # YAML 1.1 reads these as strings
    cfg = ModelConfig.from_yaml(p)
    assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 5e5
    p.write_text(required + "norm_eps: small\n")
    with pytest.raises(ConfigError, match=r"model\.norm_eps: must be a number"):
        ModelConfig.from_yaml(p)

"""Tiny random HF causal LMs of each supported family (no downloads), and the single-process reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 64


def _tiny(family: str, **over):
    import transformers as T

    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    families = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(moe, norm_topk_prob=True, head_dim=8)),
        "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, dict(moe, shared_expert_intermediate_size=24)),
        "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(
            num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
            topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)),
    }
    config_cls, model_cls, extra = families[family]
    return config_cls(**{**base, **extra, **over}), model_cls


FAMILIES = ("llama", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe")  # deepseek_v3: test_hf_deepseek.py


def hf_model(family: str, seed: int = 0, **over):
    """A seeded tiny model; every parameter redrawn (std 0.2, norms around 1) so that routing and attention are far
    from uniform and a wrong variant shows."""
    cfg, cls = _tiny(family, **over)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def batch(batch: int = 4, seq: int = 8, seed: int = 1):
    data = torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def loss_of(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hf_reference(family: str, tokens, targets, **over) -> tuple[float, dict[str, torch.Tensor]]:
    """HF's own forward on one process: loss and every gradient by HF name."""
    model = hf_model(family, **over)
    loss = loss_of(model(tokens, use_cache=False).logits, targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

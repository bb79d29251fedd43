"""One small adapter per HF family (torchtitan's state_dict_adapter.py shape), keyed on config.model_type.

An adapter maps each decoder layer onto meshplan's blocks, sharing the HF modules and Parameters, and sets the
block variants the family uses (models/moe_transformer.py: rotate-half RoPE, qkv bias, q/k norm, fused experts,
routing, gated shared experts). Attributes it does not implement are refused first (checks.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from ..models.mla import MLAttention
from ..models.moe_transformer import Attention, FeedForward, FusedExperts, MoE, OutputHead, RMSNorm
from .checks import Check, HFConfigError, check_config
from .front_door import CausalLM, DecoderBlock
from .rope import rope_tables

ADAPTERS: dict[str, type["Adapter"]] = {}


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def _meta(build):
    with torch.device("meta"):
        return build()


def norm(hf_norm: nn.Module) -> RMSNorm:
    """meshplan's RMSNorm over the HF norm's weight (same math: x * rsqrt(mean x² + eps) * w, in float32)."""
    eps = getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", None))
    out = _meta(lambda: RMSNorm(hf_norm.weight.shape[-1], eps))
    out.weight = hf_norm.weight
    return out


def ffn(hf_mlp: nn.Module) -> FeedForward:
    """gate_proj/up_proj/down_proj -> w1/w3/w2 (the HF Linear modules themselves)."""
    out = _meta(lambda: FeedForward(hf_mlp.gate_proj.in_features, hf_mlp.gate_proj.out_features))
    out.w1, out.w3, out.w2 = hf_mlp.gate_proj, hf_mlp.up_proj, hf_mlp.down_proj
    return out


class Adapter:
    """The Llama-shaped decoder: embed_tokens, layers[i].{input_layernorm, self_attn, post_attention_layernorm,
    mlp}, norm, lm_head. Subclasses name their model types, their extra config checks and their MoE block."""

    model_types: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()

    def __init__(self, model: nn.Module, max_seq_len: int | None = None):
        self.hf, self.config = model, model.config
        self.max_seq_len = max_seq_len or self.config.max_position_embeddings

    def build(self) -> CausalLM:
        check_config(self.config, self.checks)
        base = self.hf.model
        device = base.embed_tokens.weight.device
        self.cos, self.sin = rope_tables(base.rotary_emb, self.max_seq_len, device)
        layers = [DecoderBlock(norm(layer.input_layernorm), self.attention(layer.self_attn),
                               norm(layer.post_attention_layernorm), self.mlp(layer.mlp))
                  for layer in base.layers]
        head = self.hf.lm_head
        output = _meta(lambda: OutputHead(head.in_features, head.out_features, bias=False))
        output.weight = head.weight
        return CausalLM(base.embed_tokens, layers, norm(base.norm), output, self.hf, self.max_seq_len)

    # ---- blocks ------------------------------------------------------------------------------------------
    def attention(self, hf: nn.Module) -> Attention:
        c = self.config
        shape = SimpleNamespace(dim=c.hidden_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                                head_dim=hf.head_dim, max_seq_len=1, rope_theta=1.0)
        if 2 * self.cos.shape[-1] != hf.head_dim:  # e.g. partial_rotary_factor < 1
            raise HFConfigError(f"{c.model_type}: RoPE over {2 * self.cos.shape[-1]} of head_dim={hf.head_dim} "
                                      f"dims (meshplan rotates every dim of a head)")
        out = _meta(lambda: Attention(shape))
        out.wq, out.wk, out.wv, out.wo = hf.q_proj, hf.k_proj, hf.v_proj, hf.o_proj
        out.rope_cos, out.rope_sin = self.cos, self.sin
        out.rope_style = "half"
        if abs(hf.scaling - hf.head_dim ** -0.5) > 1e-12:
            out.scale = hf.scaling
        if getattr(hf, "q_norm", None) is not None:
            out.q_norm, out.k_norm = norm(hf.q_norm), norm(hf.k_norm)
            out.qk_norm = "head" if hf.q_norm.weight.shape[-1] == hf.head_dim else "proj"
        return out

    def mlp(self, hf: nn.Module) -> nn.Module:
        return self.moe(hf) if hasattr(hf, "experts") else ffn(hf)

    def moe(self, hf: nn.Module) -> MoE:
        e, two_f, d = hf.experts.gate_up_proj.shape
        shape = SimpleNamespace(dim=d, ffn_dim=two_f // 2, n_experts=e, top_k=hf.gate.top_k,
                                norm_topk_prob=self.norm_topk_prob(hf), capacity_factor=None, n_shared_experts=0)
        out = _meta(lambda: MoE(shape))
        out.gate = _meta(lambda: nn.Linear(d, e, bias=False))
        out.gate.weight = hf.gate.weight
        out.experts = _meta(lambda: FusedExperts(d, two_f // 2, e))
        out.experts.w13, out.experts.w2 = hf.experts.gate_up_proj, hf.experts.down_proj
        return out

    def norm_topk_prob(self, hf: nn.Module) -> bool:
        return bool(self.config.norm_topk_prob)


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama",)


@register_adapter
class MixtralAdapter(Adapter):
    model_types = ("mixtral",)

    def norm_topk_prob(self, hf: nn.Module) -> bool:
        return True  # MixtralTopKRouter always renormalises the top-k probabilities


@register_adapter
class Qwen3MoeAdapter(Adapter):
    """Qwen3-MoE: per-head q/k RMSNorm; dense layers where mlp_only_layers / decoder_sparse_step say (the HF
    layer's own block decides)."""
    model_types = ("qwen3_moe",)


@register_adapter
class OlmoeAdapter(Adapter):
    """OLMoE: q/k RMSNorm over the whole projection (so attention runs sp or replicate, never head-split tp)."""
    model_types = ("olmoe",)


@register_adapter
class Qwen2MoeAdapter(Adapter):
    """Qwen2-MoE: qkv bias, a shared expert scaled per token by sigmoid(shared_expert_gate)."""
    model_types = ("qwen2_moe",)

    def moe(self, hf: nn.Module) -> MoE:
        out = super().moe(hf)
        out.shared, out.shared_gate = ffn(hf.shared_expert), hf.shared_expert_gate
        return out


@register_adapter
class DeepseekV3Adapter(Adapter):
    """DeepSeek-V3: multi-head latent attention (models/mla.py; sp, tp, replicate), dense first_k_dense_replace
    layers, sigmoid routing over n_group groups with the score-correction bias and routed scaling, an ungated
    shared expert."""
    model_types = ("deepseek_v3",)

    def attention(self, hf: nn.Module) -> MLAttention:
        c = self.config
        out = _meta(lambda: MLAttention(c.hidden_size, hf.num_heads, hf.q_lora_rank, hf.kv_lora_rank,
                                        hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim,
                                        hf.kv_a_layernorm.variance_epsilon, bias=bool(c.attention_bias)))
        if hf.q_lora_rank is None:
            out.wq = hf.q_proj
        else:
            out.wq_a, out.q_norm, out.wq_b = hf.q_a_proj, norm(hf.q_a_layernorm), hf.q_b_proj
            out.norm_eps = hf.q_a_layernorm.variance_epsilon
        out.wkv_a, out.kv_norm = hf.kv_a_proj_with_mqa, norm(hf.kv_a_layernorm)
        out.wkv_b, out.wo = hf.kv_b_proj, hf.o_proj
        if hf.q_lora_rank is not None and hf.q_a_layernorm.variance_epsilon != hf.kv_a_layernorm.variance_epsilon:
            raise HFConfigError("deepseek_v3: q_a_layernorm and kv_a_layernorm epsilons differ")
        out.rope_cos, out.rope_sin = self.cos, self.sin
        # HF's rope_interleave pairs dims (2i, 2i+1) and writes them out as halves: q and k get the same
        # permutation of their rotary dims, so every score q·k equals meshplan's interleaved rotation's.
        out.rope_style = "interleaved" if c.rope_interleave else "half"
        out.scale = hf.scaling
        return out

    def moe(self, hf: nn.Module) -> MoE:
        out = super().moe(hf)
        g = hf.gate
        out.routing = {"scoring": "sigmoid", "n_group": g.num_group, "topk_group": g.topk_group,
                       "routed_scale": float(g.routed_scaling_factor), "top_k": g.top_k,
                       "norm_topk_prob": bool(g.norm_topk_prob)}
        out.register_buffer("score_bias", g.e_score_correction_bias, persistent=False)
        out.router_fp32 = True
        out.shared = ffn(hf.shared_experts)
        return out

"""Leaf op kinds: which nn.Module classes the tracer keeps whole, their hyperparameters, shapes and FLOPs.

A LeafSpec says, for one module class: the op kind, how to read its hyperparameters (attrs), the output shape from
the input shapes (sympy), forward FLOPs, and the parameters one token touches. Users register their own blocks
with `register_leaf`.

FLOP conventions (forward; training is ~3x): a [T, a] x [a, b] matmul is 2·T·a·b. Causal attention's score and
value products count half of the full S x S square (what a causal kernel computes): 2·B·S²·Hq·hd in total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch.nn as nn

from . import graph as G
from .graph import prod

Shape = tuple[sympy.Expr, ...]


@dataclass(frozen=True)
class LeafSpec:
    """How the tracer treats one module class.

    token_wise / batch_wise: whether output position (b, s) / sample b depends only on the same input position /
    sample (locality.py) — a bool, or a function of the module (nn.LayerNorm over two dims is not token-wise).
    strategies: the kind's strategies the runtime executes *for this class* (a tuple, a function of the module,
    or None for all of them); a user's block gets ("replicate",) unless it says otherwise, since meshplan's
    parallel implementations compute meshplan's math, not the block's. builtin: meshplan's own registration
    (its output shape is computed from attrs; a user's block is shape-propagated on fake tensors instead)."""
    kind: str
    attrs: Callable[[nn.Module], dict[str, Any]]
    out_shape: Callable[[dict, list[Shape]], Shape] = lambda a, ins: ins[0]
    flops: Callable[[dict, list[Shape]], sympy.Expr] = lambda a, ins: sympy.Integer(0)
    # parameters one token touches; None -> all of the op's parameters
    active_params: Callable[[dict, int], int] | None = None
    out_dtype: Callable[[nn.Module, list[str]], str] | None = None  # None -> the first input's dtype
    token_wise: bool | Callable[[nn.Module], bool] = False
    batch_wise: bool = True
    strategies: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...] | None] | None = ("replicate",)
    builtin: bool = False

    def is_token_wise(self, module: nn.Module) -> bool:
        return bool(self.token_wise(module) if callable(self.token_wise) else self.token_wise)

    def strategies_for(self, module: nn.Module) -> tuple[str, ...] | None:
        return self.strategies(module) if callable(self.strategies) else self.strategies


_REGISTRY: dict[type, LeafSpec] = {}


def register_leaf(cls: type, spec: LeafSpec | None = None, *, kind: str | None = None,
                  attrs: Callable[[nn.Module], dict] | None = None, token_wise: bool = False,
                  batch_wise: bool = True, strategies: tuple[str, ...] | None = ("replicate",), **fns) -> None:
    """Keep `cls` whole when tracing. Either a full LeafSpec, or kind= (and optional attrs=, out_shape=, flops=).

    token_wise=True declares that each output position depends only on the same input position (then `seq`,
    sequence sharding, may be planned for it); batch_wise=False that it mixes samples (no data parallelism).
    strategies: which of the kind's parallel strategies meshplan's runtime may run for it — only declare more
    than ("replicate",) if the block computes exactly what meshplan's block of that kind computes with the same
    parameter names. kind="generic": any block, shape-propagated as it is; it runs whole on each rank."""
    if spec is None:
        if kind not in G.OP_KINDS or kind in (G.INPUT, G.OUTPUT):
            raise ValueError(f"register_leaf({cls.__name__}): kind must be one of {G.OP_KINDS[2:]}, got {kind!r}")
        if strategies is not None:
            unknown = [s for s in strategies if s not in _kind_strategies(kind)]
            if unknown:
                raise ValueError(f"register_leaf({cls.__name__}): strategies {unknown} are not {kind} strategies "
                                 f"(valid: {', '.join(_kind_strategies(kind))})")
        spec = LeafSpec(kind=kind, attrs=attrs or (lambda m: {}), token_wise=token_wise, batch_wise=batch_wise,
                        strategies=strategies, **fns)
    _REGISTRY[cls] = spec


def _kind_strategies(kind: str) -> tuple[str, ...]:
    from .strategies import STRATEGIES

    return tuple(STRATEGIES.get(kind, {}))


def leaf_spec(module: nn.Module) -> LeafSpec | None:
    facts = leaf_facts(module)
    return facts[0] if facts else None


def leaf_facts(module: nn.Module) -> tuple[LeafSpec, bool] | None:
    """(spec, exact): exact is False for a subclass that overrides the registered class's forward — its math is
    its own, so it keeps the kind's shape rules but only runs whole (replicate), never token-wise."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls], type(module).forward is cls.forward
    return None


def tokens(shape: Shape) -> sympy.Expr:
    """Rows of a [..., features] activation: every dim but the last."""
    return prod(shape[:-1])


# ---- built-in kinds ---------------------------------------------------------------------------------
def _attention_attrs(m) -> dict:
    out = {"dim": m.wq.in_features, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim}
    if hasattr(m, "variant_attrs"):  # the variants every strategy honours (models/moe_transformer.Attention)
        out.update(m.variant_attrs())
    return out


def _attention_strategies(m) -> tuple[str, ...] | None:
    """A q/k norm over the whole projection (OLMoE) needs every head's projection on one rank: not head-split."""
    return ("sp", "replicate") if getattr(m, "qk_norm", "none") == "proj" else None


def _attention_flops(a, ins) -> sympy.Expr:
    t, d, hq, hkv, hd = tokens(ins[0]), a["dim"], a["n_heads"], a["n_kv_heads"], a["head_dim"]
    proj = 2 * t * d * (hq + 2 * hkv) * hd + 2 * t * hq * hd * d
    b, s = ins[0][0], ins[0][1]
    core = 2 * b * s * s * hq * hd  # QK^T and AV, each 2·B·S²·Hq·hd, causal half of each
    return proj + core


def _mla_flops(a, ins) -> sympy.Expr:
    """Multi-head latent attention (models/mla.py): the projections through the latents, then attention with
    q/k of nope + rope dims and v of v_head_dim."""
    t, d, h = tokens(ins[0]), a["dim"], a["n_heads"]
    qk, vd, lora = a["qk_nope_head_dim"] + a["qk_rope_head_dim"], a["v_head_dim"], a["kv_lora_rank"]
    q = d * h * qk if a["q_lora_rank"] is None else a["q_lora_rank"] * (d + h * qk)
    proj = 2 * t * (q + d * (lora + a["qk_rope_head_dim"]) + lora * h * (a["qk_nope_head_dim"] + vd) + h * vd * d)
    b, s = ins[0][0], ins[0][1]
    return proj + b * s * s * h * (qk + vd)  # causal half of 2·B·S²·H·(qk + v)


def _moe_attrs(m) -> dict:
    e, d, f = m.experts.w2.shape
    shared = m.shared.w1.out_features if m.shared is not None else 0
    out = {"dim": d, "ffn_dim": f, "n_experts": e, "top_k": m.top_k, "shared_hidden": shared,
           "capacity_factor": m.capacity_factor, "norm_topk_prob": m.norm_topk_prob}
    # the variants every strategy honours (models/moe_transformer.MoE), present only when not meshplan's default
    routing = getattr(m, "routing", None)
    if routing:
        out.update({k: v for k, v in routing.items() if k not in out})
        out["score_bias"] = getattr(m, "score_bias", None) is not None
    if getattr(m, "router_fp32", False):
        out["router_fp32"] = True
    if getattr(m, "shared_gate", None) is not None:
        out["shared_gate"] = True
    if hasattr(m.experts, "w13"):
        out["fused_experts"] = True
    return out


def _moe_flops(a, ins) -> sympy.Expr:
    t, d = tokens(ins[0]), a["dim"]
    return 2 * t * d * a["n_experts"] + a["top_k"] * 6 * t * d * a["ffn_dim"] + 6 * t * d * a["shared_hidden"]


def _moe_active(a, params) -> int:
    d = a["dim"]
    return d * a["n_experts"] + a["top_k"] * 3 * d * a["ffn_dim"] + 3 * d * a["shared_hidden"]


def _linear_attrs(m) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _linear_shape(a, ins) -> Shape:
    return tuple(ins[0][:-1]) + (sympy.Integer(a["out_features"]),)


def _linear_flops(a, ins) -> sympy.Expr:
    return 2 * tokens(ins[0]) * a["in_features"] * a["out_features"]


def _embedding_strategies(m: nn.Embedding) -> tuple[str, ...] | None:
    """The vocab-parallel lookup is a plain row gather: padding_idx (no gradient for that row), max_norm (rows
    renormalised in place) and the rest of nn.Embedding's options are honoured only by the module's own forward."""
    plain = m.padding_idx is None and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    return None if plain else ("seq", "replicate")


def _layer_norm_attrs(m) -> dict:
    dim = m.normalized_shape[-1] if m.normalized_shape else 0
    return {"dim": dim, "eps": m.eps if m.eps is not None else 0.0}


def _register_torch_modules() -> None:
    """torch.nn's own blocks. meshplan's reference blocks register themselves (models/leaves.py): the IR imports
    nothing above it."""
    # Token-wise by construction: a lookup, a row-wise norm, a matmul on the last dim.
    register_leaf(nn.Embedding, LeafSpec(
        kind=G.EMBEDDING,
        attrs=lambda m: {"num_embeddings": m.num_embeddings, "dim": m.embedding_dim},
        out_shape=lambda a, ins: tuple(ins[0]) + (sympy.Integer(a["dim"]),),
        active_params=lambda a, p: a["dim"],  # one row per token
        out_dtype=lambda m, ins: str(m.weight.dtype).removeprefix("torch."),
        token_wise=True, strategies=_embedding_strategies, builtin=True,
    ))
    layer_norm = LeafSpec(kind=G.NORM, attrs=_layer_norm_attrs, flops=NORM_SPEC.flops,
                          token_wise=lambda m: len(m.normalized_shape) == 1, strategies=None, builtin=True)
    register_leaf(nn.LayerNorm, layer_norm)
    if hasattr(nn, "RMSNorm"):
        register_leaf(nn.RMSNorm, layer_norm)
    register_leaf(nn.Linear, LeafSpec(kind=G.LINEAR, attrs=_linear_attrs, out_shape=_linear_shape,
                                      flops=_linear_flops, token_wise=True, strategies=None, builtin=True))


# A row-wise norm with a weight over the last dim (meshplan's RMSNorm; LayerNorm shares its FLOPs).
NORM_SPEC = LeafSpec(kind=G.NORM, attrs=lambda m: {"dim": m.weight.shape[-1], "eps": m.eps},
                     flops=lambda a, ins: 4 * prod(ins[0]), token_wise=True, strategies=None, builtin=True)

_register_torch_modules()

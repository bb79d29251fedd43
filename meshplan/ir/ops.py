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
    kind: str
    attrs: Callable[[nn.Module], dict[str, Any]]
    out_shape: Callable[[dict, list[Shape]], Shape] = lambda a, ins: ins[0]
    flops: Callable[[dict, list[Shape]], sympy.Expr] = lambda a, ins: sympy.Integer(0)
    # parameters one token touches; None -> all of the op's parameters
    active_params: Callable[[dict, int], int] | None = None
    out_dtype: Callable[[nn.Module, list[str]], str] | None = None  # None -> the first input's dtype


_REGISTRY: dict[type, LeafSpec] = {}


def register_leaf(cls: type, spec: LeafSpec | None = None, *, kind: str | None = None,
                  attrs: Callable[[nn.Module], dict] | None = None, **fns) -> None:
    """Keep `cls` whole when tracing. Either a full LeafSpec, or kind= (and optional attrs=, out_shape=, flops=)."""
    if spec is None:
        if kind not in G.OP_KINDS or kind in (G.INPUT, G.OUTPUT):
            raise ValueError(f"register_leaf({cls.__name__}): kind must be one of {G.OP_KINDS[2:]}, got {kind!r}")
        spec = LeafSpec(kind=kind, attrs=attrs or (lambda m: {}), **fns)
    _REGISTRY[cls] = spec


def leaf_spec(module: nn.Module) -> LeafSpec | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def tokens(shape: Shape) -> sympy.Expr:
    """Rows of a [..., features] activation: every dim but the last."""
    return prod(shape[:-1])


# ---- built-in kinds ---------------------------------------------------------------------------------
def _attention_attrs(m) -> dict:
    return {"dim": m.wq.in_features, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim}


def _attention_flops(a, ins) -> sympy.Expr:
    t, d, hq, hkv, hd = tokens(ins[0]), a["dim"], a["n_heads"], a["n_kv_heads"], a["head_dim"]
    proj = 2 * t * d * (hq + 2 * hkv) * hd + 2 * t * hq * hd * d
    b, s = ins[0][0], ins[0][1]
    core = 2 * b * s * s * hq * hd  # QK^T and AV, each 2·B·S²·Hq·hd, causal half of each
    return proj + core


def _moe_attrs(m) -> dict:
    e, f, d = m.experts.w1.shape
    shared = m.shared.w1.out_features if m.shared is not None else 0
    return {"dim": d, "ffn_dim": f, "n_experts": e, "top_k": m.top_k, "shared_hidden": shared,
            "capacity_factor": m.capacity_factor, "norm_topk_prob": m.norm_topk_prob}


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


def _register_builtins() -> None:
    from ..models import moe_transformer as mt

    register_leaf(nn.Embedding, LeafSpec(
        kind=G.EMBEDDING,
        attrs=lambda m: {"num_embeddings": m.num_embeddings, "dim": m.embedding_dim},
        out_shape=lambda a, ins: tuple(ins[0]) + (sympy.Integer(a["dim"]),),
        active_params=lambda a, p: a["dim"],  # one row per token
        out_dtype=lambda m, ins: str(m.weight.dtype).removeprefix("torch."),
    ))
    norm_spec = LeafSpec(
        kind=G.NORM,
        attrs=lambda m: {"dim": m.weight.shape[-1], "eps": m.eps},
        flops=lambda a, ins: 4 * prod(ins[0]),
    )
    register_leaf(mt.RMSNorm, norm_spec)
    register_leaf(nn.LayerNorm, LeafSpec(kind=G.NORM, attrs=lambda m: {"dim": m.normalized_shape[-1], "eps": m.eps},
                                         flops=norm_spec.flops))
    register_leaf(mt.Attention, LeafSpec(kind=G.ATTENTION, attrs=_attention_attrs, flops=_attention_flops))
    register_leaf(mt.MoE, LeafSpec(kind=G.MOE, attrs=_moe_attrs, flops=_moe_flops, active_params=_moe_active))
    register_leaf(mt.FeedForward, LeafSpec(
        kind=G.FFN,
        attrs=lambda m: {"dim": m.w1.in_features, "hidden": m.w1.out_features},
        flops=lambda a, ins: 6 * tokens(ins[0]) * a["dim"] * a["hidden"],
    ))
    register_leaf(nn.Linear, LeafSpec(kind=G.LINEAR, attrs=_linear_attrs, out_shape=_linear_shape,
                                      flops=_linear_flops))
    register_leaf(mt.OutputHead, LeafSpec(kind=G.LM_HEAD, attrs=_linear_attrs, out_shape=_linear_shape,
                                          flops=_linear_flops))


_register_builtins()

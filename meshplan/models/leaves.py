"""meshplan's reference blocks as IR leaf ops: registered here, by the models package, so that `ir/` imports nothing
above it. The attribute and FLOP functions are the IR's (ir/ops.py); what a block is (its kind, whether it is
token-wise, which strategies the runtime runs for it) is stated once, here.

Token-wise by construction: a row-wise norm, a per-token FFN, the LM head's matmul on the last dim. meshplan's MoE
routes each token on its own and its runtime strategies decide capacity on the whole batch, as the single-device
model does. Attention mixes positions (its `sp` is Ulysses, not sequence sharding).
"""
from __future__ import annotations

from ..ir import graph as G
from ..ir.ops import (
    NORM_SPEC,
    LeafSpec,
    _attention_attrs,
    _attention_flops,
    _attention_strategies,
    _linear_attrs,
    _linear_flops,
    _linear_shape,
    _mla_flops,
    _moe_active,
    _moe_attrs,
    _moe_flops,
    register_leaf,
    tokens,
)
from . import mla
from . import moe_transformer as mt


def register() -> None:
    register_leaf(mt.RMSNorm, NORM_SPEC)
    register_leaf(mt.Attention, LeafSpec(kind=G.ATTENTION, attrs=_attention_attrs, flops=_attention_flops,
                                         strategies=_attention_strategies, builtin=True))
    register_leaf(mla.MLAttention, LeafSpec(kind=G.ATTENTION, attrs=lambda m: m.attrs(), flops=_mla_flops,
                                            strategies=None, builtin=True))
    register_leaf(mt.MoE, LeafSpec(kind=G.MOE, attrs=_moe_attrs, flops=_moe_flops, active_params=_moe_active,
                                   token_wise=True, strategies=None, builtin=True))
    register_leaf(mt.FeedForward, LeafSpec(
        kind=G.FFN,
        attrs=lambda m: {"dim": m.w1.in_features, "hidden": m.w1.out_features},
        flops=lambda a, ins: 6 * tokens(ins[0]) * a["dim"] * a["hidden"],
        token_wise=True, strategies=None, builtin=True,
    ))
    register_leaf(mt.OutputHead, LeafSpec(kind=G.LM_HEAD, attrs=_linear_attrs, out_shape=_linear_shape,
                                          flops=_linear_flops, token_wise=True, strategies=None, builtin=True))


register()

"""The runtime's one implementation per (op kind, strategy): the registry ParallelModel looks each op up in.

The key is the strategy object's (meshplan/ir/strategies/registry.py); what the implementation must do with its
parameters and collectives is stated there (parameter layout, phases), and tests/test_strategy_conformance.py checks
that every registered pair has an implementation here and that its bytes and shards agree with the object. An
implementation takes the op's context (this rank's parameter shards, channels per collective) and its input laid
out as the strategy's input placement, and returns its output in the strategy's output placement.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir import graph as G
from .expert_parallel import moe_ep
from .local_ops import module_forward
from .moe_tensor_parallel import moe_ag_scatter, moe_local
from .op_context import OpContext
from .tensor_parallel import attention_tp, embedding_vocab, ffn_tp, linear_tp
from .ulysses_attention import attention_sp

Impl = Callable[[OpContext, torch.Tensor], torch.Tensor]

IMPLEMENTATIONS: dict[tuple[str, str], Impl] = {
    (G.ATTENTION, "sp"): attention_sp,
    (G.ATTENTION, "tp"): attention_tp,
    (G.ATTENTION, "replicate"): module_forward,
    (G.MOE, "ep"): moe_ep,
    (G.MOE, "tp"): moe_local,
    (G.MOE, "ag_scatter"): moe_ag_scatter,
    (G.MOE, "seq"): moe_local,
    (G.MOE, "replicate"): moe_local,
    (G.FFN, "tp"): ffn_tp,
    (G.FFN, "seq"): module_forward,
    (G.FFN, "replicate"): module_forward,
    (G.EMBEDDING, "vocab"): embedding_vocab,
    (G.EMBEDDING, "seq"): module_forward,
    (G.EMBEDDING, "replicate"): module_forward,
    (G.NORM, "seq"): module_forward,
    (G.NORM, "replicate"): module_forward,
    (G.LINEAR, "tp"): linear_tp,
    (G.LINEAR, "seq"): module_forward,
    (G.LINEAR, "replicate"): module_forward,
    (G.LM_HEAD, "seq"): module_forward,
    (G.LM_HEAD, "replicate"): module_forward,
}

"""Ops that need no communication of their own: the model's module, run on local shards with local weights.

"seq" (sequence-sharded tokens, replicated weights) and "replicate" (every rank computes the whole op) are the
single-device forward applied to whatever rows this rank holds; so is a column/row split that leaves the module's
math unchanged (a SwiGLU FFN with w1/w3 rows and w2 columns split yields a Partial sum). The module runs through
torch.func.functional_call with this rank's tensors, so its code is the reference's code.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from .op_context import OpContext


def run_module(ctx: OpContext, inputs: list[torch.Tensor], kwargs: dict | None = None) -> torch.Tensor:
    if ctx.module is None:
        raise RuntimeError(f"op {ctx.op.name!r}: no module to run")
    return functional_call(ctx.module, ctx.params, tuple(inputs), kwargs or {}, strict=False)


def module_forward(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return run_module(ctx, [x])

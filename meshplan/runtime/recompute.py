"""Activation recomputation as the plan says (plan.meta["activation_recompute"], what the planner priced).

"full": every op keeps only its inputs and reruns its forward, collectives included, during backward
(planner/memory.py checkpoint_bytes; Korthikanti et al. 2022, docs/reference.md "Memory"). "selective": the
norms are rerun (Megatron's `layernorm` recompute module); the MoE activation that the planner's selective
granularity also drops (`moe_act`, inside the experts) is kept by the runtime, so a selective plan holds more
than priced there. "none" (or absent): nothing is rerun. Checkpointing is torch.utils.checkpoint's non-reentrant
form, which saves the inputs, replays the forward (and its RNG state) when backward first needs a saved tensor,
and so re-issues the op's collectives in the same order on every rank, as torchtitan's activation checkpointing
under tensor parallelism does.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..ir import graph as G
from ..ir.graph import Op
from ..ir.plan import Plan, recompute_granularity


def recomputed_ops(plan: Plan, ops: list[Op]) -> frozenset[str]:
    """The ops whose forward is rerun in backward under the plan's granularity."""
    granularity = recompute_granularity(plan.meta)
    if granularity == "none":
        return frozenset()
    keep = (lambda op: True) if granularity == "full" else (lambda op: op.kind == G.NORM)
    return frozenset(op.name for op in ops if op.kind not in (G.INPUT, G.OUTPUT) and keep(op))


def run_recomputed(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """fn(*args), keeping only what backward needs to rerun it (its tensor arguments)."""
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)

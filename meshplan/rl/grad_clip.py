"""Global gradient-norm clipping of a ParallelModel's shards, correct under any plan.

The one function the RL engine clips with (a runtime-wide, DTensor-based clip can replace it at one call site);
the identity it rests on: docs/reference.md, "Backends and global gradient norms".
A parameter's local shard holds 1/n of its gradient along each mesh axis the plan shards it on, and a whole copy
along every other axis; so the squared global norm is the sum over ranks of each shard's squared norm divided by
the number of ranks holding the same piece (the product of the sizes of its replicated axes), all-reduced over
the world. Called after reduce_gradients: replicated copies are equal then.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _copies(pm, name: str) -> int:
    """How many ranks hold the same piece of `name`: the product of the mesh axes it is not sharded on."""
    return math.prod(size for (_, size), pl in zip(pm.plan.mesh.axes, pm.placement_of(name))
                     if getattr(pl, "dim", None) is None)


def global_grad_norm(pm) -> torch.Tensor:
    """The 2-norm of the full gradient, as a 0-dim tensor (a collective over the world when the mesh has more than
    one rank). On one rank it is exactly torch.nn.utils.clip_grad_norm_'s norm (the norm of the per-tensor norms)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) / math.sqrt(_copies(pm, name))
             for name, p in pm.named_parameters() if p.grad is not None]
    if not norms:
        return torch.zeros((), device=pm.groups.device)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if pm.plan.mesh.size > 1:
        sq = total.double().square()
        dist.all_reduce(sq)
        total = sq.sqrt().to(total.dtype)
    return total


@torch.no_grad()
def clip_grad_norm_(pm, max_norm: float | None) -> float:
    """Scale every shard's gradient so the global norm is at most max_norm (None or 0: no clipping), as
    torch.nn.utils.clip_grad_norm_ does; returns the norm before clipping. Every rank uses the same scale."""
    total = global_grad_norm(pm)
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in pm.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return float(total)

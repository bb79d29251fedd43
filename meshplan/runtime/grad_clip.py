"""Global gradient-norm clipping under any plan: torch.nn.utils.clip_grad_norm_ of the single-device model.

    pm.reduce_gradients()
    clip_grad_norm_(grad_pieces(pm), max_norm=1.0, axes=pm.axes)          # plain AdamW over pm's shards
    clip_grad_norm_(zero_opt.grad_pieces(), 1.0, pm.axes)                 # ZeroAdamW (zero.py)
    clip_grad_norm_(grad_pieces(runner.model), 1.0, [runner.pp, *runner.model.axes])   # a pipeline stage

The norm counts every element of the model's gradient exactly once: each rank sums the squares of the gradients
it holds, a gradient replicated on some axes (a replicated parameter after its reduction) only at coordinate 0 of
those axes, and the sums are all-reduced over every axis of the mesh, so shards (tp, ep, vocab, ZeRO slices,
pipeline stages) add up and copies count once. Call it after the gradients are reduced. The coefficient is
torch's, max_norm / (norm + 1e-6) clamped to 1, applied to every copy, so the replicas stay identical
(docs/reference.md, "Gradient clipping").
"""
from __future__ import annotations

from typing import Iterable

import torch

from .collectives import Channel, all_reduce
from .comm_stats import GRAD, CommStats
from .device_mesh import local_tensor
from .executor import ParallelModel
from .process_groups import AxisGroup
from .zero import GradPiece

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def grad_pieces(pm: ParallelModel) -> list[GradPiece]:
    """pm's gradients after pm.reduce_gradients() (their local shards, which clipping scales in place, so the
    DTensor gradients are scaled), each with the axes it is replicated on."""
    return [GradPiece(local_tensor(e.param.grad), e.axes) for e in pm.grad_entries() if e.param.grad is not None]


@torch.no_grad()
def global_grad_norm(pieces: Iterable[GradPiece], axes: Iterable[AxisGroup],
                     stats: CommStats | None = None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (a scalar in float32, or float64 for float64 gradients; the same
    on every rank; a collective over `axes`, which must be every axis of the mesh, a pipeline's pp axis included)."""
    pieces = list(pieces)
    device = pieces[0].grad.device if pieces else torch.device("cpu")
    dtype = torch.float64 if any(p.grad.dtype == torch.float64 for p in pieces) else torch.float32
    axes = [g for g in axes if g.size > 1]
    if not axes and pieces:  # one rank: torch's own arithmetic (the norm of the per-tensor norms), bit for bit
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().to(dtype))
                                                     for p in pieces]))
    # across ranks: squares summed (a sum's cascade is accurate over a ZeRO bucket's large flat slices, where one
    # float32 vector_norm was off by 4e-5), then all-reduced over every axis
    total = torch.zeros((), dtype=dtype, device=device)
    for piece in pieces:
        if all(g.index == 0 for g in piece.copies):
            total += piece.grad.detach().to(dtype).square().sum()
    for g in axes:
        total = all_reduce(total, Channel(g, "grad_norm", "norm", "fp32", stats), GRAD)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(pieces: Iterable[GradPiece], max_norm: float, axes: Iterable[AxisGroup],
                    stats: CommStats | None = None) -> torch.Tensor:
    """Scale every gradient in `pieces` so that the global norm is at most max_norm; returns the norm before
    clipping (as torch.nn.utils.clip_grad_norm_). A non-finite norm is returned and the gradients become
    non-finite, as torch's default (error_if_nonfinite=False) does."""
    if not max_norm > 0:
        raise ValueError(f"max_norm: must be > 0, got {max_norm}")
    pieces = list(pieces)
    norm = global_grad_norm(pieces, axes, stats)
    coef = torch.clamp(max_norm / (norm + EPS), max=1.0)
    for piece in pieces:
        piece.grad.mul_(coef.to(piece.grad.dtype))
    return norm

"""Cross-entropy on this rank's shard of the logits, without gathering them.

The logits of the last op arrive in its output placement, one per mesh axis:
  Shard(0) / Shard(1)   this rank holds some of the tokens: its token losses are a summand of the total;
  Shard(2) (= Shard(-1)) this rank holds a slice of the vocabulary (vocab-parallel): the log-sum-exp and the
                        target logit are reduced over that axis (Megatron's vocab-parallel cross-entropy, the
                        math of torch.distributed.tensor.parallel.loss_parallel: all-reduce the row max, all-reduce
                        the sum of exp(logit - max), the target logit from the rank that owns it);
  Partial               a summand of the logits (a row-parallel last op): summed first, as any non-linear loss needs;
  Replicate             every rank holds the same tokens: counted once (seed_grad's convention).
The token sums are then all-reduced over the token-sharded axes (one scalar each) and divided by the global token
count, so every rank returns the mean over the global batch, differentiable: with the gradient seeded on the
mesh's root (collectives.py's convention: a replicated value's gradient is Partial), backward gives every shard of
the logits its true gradient. The bytes moved are B·S/ranks floats per vocab reduction instead of the all-gather
of B·S·V logits (docs/reference.md, "Loss on local shards").

Targets come in a placement of their own (the global batch on every rank, or the data loader's local shard);
`align_targets` moves them to the logits' token layout (a slice, or an all-gather of int64 ids at most).
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from ..ir.placement import Partial, Placement, Replicate, Shard
from .collectives import Channel, _wait, seed_grad, sum_partial
from .comm_stats import FWD, CommStats
from .process_groups import AxisGroup
from .redistribute import normalize, redistribute

TOKEN_DIMS = (0, 1)


def _vocab_axes(placement: tuple[Placement, ...], axes: list[AxisGroup]) -> list[AxisGroup]:
    return [g for g, p in zip(axes, placement) if isinstance(p, Shard) and p.dim == 2 and g.size > 1]


def _token_axes(placement: tuple[Placement, ...], axes: list[AxisGroup]) -> list[AxisGroup]:
    return [g for g, p in zip(axes, placement) if isinstance(p, Shard) and p.dim in TOKEN_DIMS and g.size > 1]


def target_placement(placement: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """The layout of the [B, S] targets that matches logits laid out as `placement`: token shards kept, vocab
    shards and partial sums replicated."""
    return tuple(p if isinstance(p, Shard) and p.dim in TOKEN_DIMS else Replicate() for p in placement)


def align_targets(targets: torch.Tensor, src: tuple[Placement, ...], logits_placement: tuple[Placement, ...],
                  axes: list[AxisGroup], stats: CommStats | None = None) -> torch.Tensor:
    """targets held as `src` -> the layout of logits placed as `logits_placement` (no autograd: ids)."""
    dst = target_placement(normalize(logits_placement, 3))
    with torch.no_grad():
        return redistribute(targets, src, dst, axes, op="loss", tag="targets", stats=stats)


def _max_over(x: torch.Tensor, ch: Channel) -> torch.Tensor:
    """Element-wise max over the axis (no gradient: the max is subtracted and added back, so it cancels)."""
    out = x.detach().contiguous()
    ch.record("all_reduce", FWD, 2 * out.numel() * out.element_size() * (ch.n - 1) / ch.n)
    return _wait(funcol.all_reduce(out, "max", ch.group.group_name))


def _vocab_parallel_nll(logits: torch.Tensor, targets: torch.Tensor, vocab_axes: list[AxisGroup],
                        stats: CommStats | None) -> torch.Tensor:
    """Per-token -log softmax(logits)[target] for logits [b, s, V/n] split over `vocab_axes` (outer first)."""
    x = logits.float()
    v_local = x.shape[-1]
    chans = [Channel(g, "loss", "vocab", "fp32", stats) for g in vocab_axes]
    # This rank's first vocabulary id: outer axes split first (redistribute.py's row-major layout).
    start, stride = 0, v_local
    for g in reversed(vocab_axes):
        start += g.index * stride
        stride *= g.size
    m = x.detach().amax(-1)
    for ch in chans:
        m = _max_over(m, ch)
    sumexp = (x - m.unsqueeze(-1)).exp().sum(-1)
    local_t = targets - start
    owned = (local_t >= 0) & (local_t < v_local)
    tgt = x.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * owned
    both = torch.stack([sumexp, tgt])
    for ch in chans:  # summands -> sums on every rank (one all-reduce); backward gives each the full gradient
        both = sum_partial(both, ch)
    return m + both[0].log() - both[1]


def cross_entropy(logits: torch.Tensor, placement: tuple[Placement, ...], targets: torch.Tensor,
                  axes: list[AxisGroup], global_tokens: int, *, root: bool,
                  stats: CommStats | None = None) -> torch.Tensor:
    """The mean cross-entropy over the global batch, the same scalar on every rank.

    logits: this rank's [b, s, v] shard laid out as `placement`; targets: [b, s] ids already aligned to it
    (align_targets); global_tokens: B·S of the whole batch; root: whether this rank is the mesh's coordinate 0
    on every axis (where the loss gradient is seeded)."""
    if logits.dim() != 3:
        raise ValueError(f"loss: expected logits [batch, seq, vocab], got shape {tuple(logits.shape)}")
    placement = normalize(placement, 3)
    for i, (g, p) in enumerate(zip(axes, placement)):
        if isinstance(p, Partial) and g.size > 1:  # a summand: the loss is not linear in it
            to = list(placement)
            to[i] = Replicate()
            logits = redistribute(logits, placement, tuple(to), axes, op="loss", tag="partial", stats=stats)
            placement = tuple(to)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"loss: targets {tuple(targets.shape)} do not match this rank's logits "
                         f"{tuple(logits.shape)} (align them with align_targets)")
    vocab_axes = _vocab_axes(placement, axes)
    if vocab_axes:
        local = _vocab_parallel_nll(logits, targets, vocab_axes, stats).sum()
    else:
        local = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    # Seeding before the token sums: each rank's seeded 1 flows back through the all-reduces' backward (another
    # all-reduce), which hands every token shard the gradient the root seeded and zero to its replicas.
    for g in _token_axes(placement, axes):
        local = sum_partial(local, Channel(g, "loss", "tokens", "fp32", stats))
    return seed_grad(local / global_tokens, keep=root)

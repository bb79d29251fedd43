"""Data-parallel gradient reduction: sum each parameter's gradient over the ranks that replicate it.

A local parameter shard is replicated on every mesh axis its op does not split it on, and there its gradient is a
Partial sum (collectives.py's convention), so the reduction is an all-reduce over exactly those axes. Gradients
with the same set of axes and wire precision are flattened into buckets (fewer, larger collectives). Over two or
more axes the reduction is hierarchical (REFERENCE.md): reduce-scatter on the innermost axis (intra-node), all-reduce
of the 1/n shard on each outer axis, all-gather on the innermost axis, so outer links carry 1/n of the bytes.

precision "bf16" (plan precision["grad"]): each reduce-scatter is an all-to-all of bfloat16 chunks (the float32
gradients cast once per axis they are summed over: once for one axis) summed locally in float32, and the reduced
shards are all-gathered in float32 (the sum itself is not rounded again). "fp32" reduces in the gradients' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import Channel, all_gather, all_reduce, reduce_scatter
from .comm_stats import GRAD, CommStats, Key
from .process_groups import AxisGroup


@dataclass
class GradEntry:
    name: str
    param: torch.Tensor
    axes: tuple[AxisGroup, ...]  # the axes (size > 1) the shard is replicated on, mesh order
    precision: str  # "fp32" | "bf16"
    op: str  # the op that owns the parameter, for accounting


def _pad_to(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    pad = (-x.numel()) % n
    return (torch.cat([x, x.new_zeros(pad)]) if pad else x), pad


def _all_reduce_grad(x: torch.Tensor, g: AxisGroup, precision: str, stats: CommStats) -> torch.Tensor:
    if precision == "fp32":
        return all_reduce(x, Channel(g, "", GRAD, "fp32", stats), GRAD)
    flat, pad = _pad_to(x, g.size)
    part = reduce_scatter(flat, 0, Channel(g, "", GRAD, precision, stats), GRAD)
    full = all_gather(part, 0, Channel(g, "", GRAD, "fp32", stats), GRAD)
    return full[: x.numel()]


def reduce_flat(x: torch.Tensor, axes: tuple[AxisGroup, ...], precision: str, stats: CommStats) -> torch.Tensor:
    """Sum a flat buffer over the product of `axes` (hierarchically when there are several)."""
    if len(axes) == 1:
        return _all_reduce_grad(x, axes[0], precision, stats)
    intra = axes[-1]
    flat, pad = _pad_to(x, intra.size)
    shard = reduce_scatter(flat, 0, Channel(intra, "", GRAD, precision, stats), GRAD)
    for g in axes[:-1]:
        shard = _all_reduce_grad(shard, g, precision, stats)
    return all_gather(shard, 0, Channel(intra, "", GRAD, "fp32", stats), GRAD)[: x.numel()]


class GradReducer:
    def __init__(self, entries: list[GradEntry], stats: CommStats, bucket_mb: float = 25.0):
        self.stats = stats
        self.buckets: list[list[GradEntry]] = []
        groups: dict[tuple, list[GradEntry]] = {}
        for e in reversed(entries):  # last layers first, the order their gradients become ready
            if e.axes:
                groups.setdefault((tuple(g.name for g in e.axes), e.precision), []).append(e)
        cap = max(1, int(bucket_mb * 2 ** 20))
        for group in groups.values():
            bucket, size = [], 0
            for e in group:
                nbytes = e.param.numel() * e.param.element_size()
                if bucket and size + nbytes > cap:
                    self.buckets.append(bucket)
                    bucket, size = [], 0
                bucket.append(e)
                size += nbytes
            if bucket:
                self.buckets.append(bucket)

    @torch.no_grad()
    def reduce(self) -> None:
        for bucket in self.buckets:
            grads = [e.param.grad if e.param.grad is not None else torch.zeros_like(e.param) for e in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            local = CommStats()
            out = reduce_flat(flat, bucket[0].axes, bucket[0].precision, local)
            self._account(bucket, local)
            offset = 0
            for e, g in zip(bucket, grads):
                k = g.numel()
                e.param.grad = out[offset:offset + k].view_as(e.param).to(e.param.dtype).clone()
                offset += k

    def _account(self, bucket: list[GradEntry], local: CommStats) -> None:
        """Split a bucket's bytes among the ops whose parameters it carries, by element count."""
        sizes: dict[str, int] = {}
        for e in bucket:
            sizes[e.op] = sizes.get(e.op, 0) + e.param.numel()
        total = sum(sizes.values())
        for key, nbytes in local.bytes.items():
            left = nbytes
            ops = list(sizes)
            for i, op in enumerate(ops):
                share = left if i == len(ops) - 1 else nbytes * sizes[op] // total
                left -= share
                k = Key(key.kind, op, key.tag, key.phase, key.axis)
                self.stats.bytes[k] += share
                self.stats.calls[k] += local.calls[key]

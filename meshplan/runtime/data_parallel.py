"""Data-parallel gradient reduction: sum each parameter's gradient over the ranks that replicate it.

A local parameter shard is replicated on every mesh axis its op does not split it on, and there its gradient is a
Partial sum (collectives.py's convention; a DTensor parameter's gradient says so in its placements,
device_mesh.grad_placements), so the reduction is an all-reduce over exactly those axes. It works on the local
tensors of the gradients and leaves each a DTensor laid out as its parameter (device_mesh.laid_out_as). Gradients
with the same set of axes and wire precision are flattened into buckets (fewer, larger collectives). Over two or
more axes the reduction is hierarchical (docs/reference.md, "Communication volumes"): reduce on the innermost axis
(intra-node) first, then on
each outer axis on the 1/n shard, then gather back outermost first, so outer links carry 1/n of the bytes.

precision "fp32": reduce-scatter / all-reduce / all-gather in the gradients' dtype.
precision "bf16" (plan precision["grad"]; docs/reference.md, "Communication compression"): the float32-accumulated
bucket is cast to bfloat16 ONCE; each axis's reduce-scatter is an all-to-all of bf16 shards summed locally in
float32; the reduced shard is cast to bf16 once more and all-gathered in bf16. Why the gather is bf16 too: the
point is half the bytes of the fp32 all-reduce (an fp32 gather would leave 3/4), and rounding a finished fp32
sum is not low-precision accumulation. Every rank, the shard's owner included, decodes the same bf16 values, so
the replicas stay bit-identical. Roundings per value: one at the source, one for the gather, and over two axes
one more of the intra-node fp32 partial sum before the inter-node hop -- the only alternative, forwarding the
unsummed bf16 pieces, would send n times the bytes over the slow link (measure/error_model.py measures all three).
"""
from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol

from .collectives import Channel, _ag_raw, _nbytes, _wait, all_gather, all_reduce, issue_a2a
from .comm_stats import GRAD, CommStats, Key
from .device_mesh import laid_out_as, local_tensor
from .grad_overlap import drive
from .process_groups import AxisGroup


@dataclass
class GradEntry:
    name: str
    param: torch.Tensor  # the parameter: a DTensor (a plain tensor on a one-rank mesh)
    axes: tuple[AxisGroup, ...]  # the axes (size > 1) the shard is replicated on, mesh order
    precision: str  # "fp32" | "bf16"
    op: str  # the op that owns the parameter, for accounting

    @property
    def local(self) -> torch.Tensor:
        """This rank's shard of the parameter."""
        return local_tensor(self.param)

    def local_grad(self) -> torch.Tensor:
        """This rank's shard of the gradient (zeros when there is none)."""
        g = self.param.grad
        return local_tensor(g) if g is not None else torch.zeros_like(self.local)

    def set_grad(self, local: torch.Tensor) -> None:
        """Make `local` (this rank's shard) the parameter's gradient, laid out as the parameter."""
        self.param.grad = laid_out_as(self.param, local)


def _pad_to(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    pad = (-x.numel()) % n
    return (torch.cat([x, x.new_zeros(pad)]) if pad else x), pad


def _issue_all_reduce(x: torch.Tensor, ch: Channel) -> torch.Tensor:
    """collectives.all_reduce's fp32 path, issued without waiting (an AsyncCollectiveTensor in eager)."""
    ch.record("all_reduce", GRAD, 2 * _nbytes(x) * (ch.n - 1) / ch.n)
    return funcol.all_reduce(x.contiguous(), "sum", ch.group.group_name) if x.numel() else x.clone()


def _issue_reduce_scatter(x: torch.Tensor, ch: Channel) -> torch.Tensor:
    """collectives.reduce_scatter's fp32 path over dim 0 of a flat buffer, issued without waiting."""
    ch.record("reduce_scatter", GRAD, _nbytes(x) * (ch.n - 1) / ch.n)
    if not x.numel():
        return x.chunk(ch.n, 0)[0].clone()
    return funcol.reduce_scatter_single(x.contiguous(), "sum", 0, ch.group.group_name)


Steps = Generator[torch.Tensor, torch.Tensor, torch.Tensor]


def _reduce_fp32(x: torch.Tensor, axes: tuple[AxisGroup, ...], stats: CommStats) -> Steps:
    ch = lambda g: Channel(g, "", GRAD, "fp32", stats)  # noqa: E731
    if len(axes) == 1:
        return (yield _issue_all_reduce(x, ch(axes[0])))
    intra = axes[-1]
    flat, _ = _pad_to(x, intra.size)
    shard = yield _issue_reduce_scatter(flat, ch(intra))
    for g in axes[:-1]:
        shard = all_reduce(shard, ch(g), GRAD)
    return all_gather(shard, 0, ch(intra), GRAD)[: x.numel()]


def _reduce_bf16(x: torch.Tensor, axes: tuple[AxisGroup, ...], stats: CommStats) -> Steps:
    """All-to-all of bf16 shards + float32 local sums, innermost axis first; bf16 all-gathers back."""
    flat, _ = _pad_to(x.float(), math.prod(g.size for g in axes))
    wire = flat.to(torch.bfloat16)  # the one cast of the float32-accumulated local gradient
    for i, g in enumerate(reversed(axes)):  # innermost first: each hop leaves 1/size of the buffer for the next
        issued = issue_a2a(wire.view(g.size, -1), Channel(g, "", GRAD, "bf16", stats), GRAD)
        recv = (yield issued) if i == 0 else _wait(issued)  # only the first hop is left in flight (overlap.py)
        wire = recv.float().sum(0).to(torch.bfloat16)  # fp32 sum of the pieces; rounded once for the next trip
    for g in axes:  # outermost first: the exact inverse of the scatter order above
        wire = _ag_raw(wire, Channel(g, "", GRAD, "bf16", stats), GRAD).view(-1)
    return wire.float()[: x.numel()].to(x.dtype)


def reduce_flat_steps(x: torch.Tensor, axes: tuple[AxisGroup, ...], precision: str, stats: CommStats) -> Steps:
    """reduce_flat as steps: the generator issues the first collective and yields it (in flight); sent its
    waited result, it finishes the reduction synchronously and returns the sum (grad_overlap.drive)."""
    if precision == "fp32" or not x.is_floating_point():
        return (yield from _reduce_fp32(x, axes, stats))
    if precision != "bf16":
        raise ValueError(f"gradient precision {precision!r}: gradients are exchanged in fp32 or bf16 "
                         f"(docs/reference.md, 'Communication compression': FP8 is for activations)")
    return (yield from _reduce_bf16(x, axes, stats))


def reduce_flat(x: torch.Tensor, axes: tuple[AxisGroup, ...], precision: str, stats: CommStats) -> torch.Tensor:
    """Sum a flat buffer over the product of `axes` (hierarchically when there are several)."""
    return drive(reduce_flat_steps(x, axes, precision, stats))


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
                nbytes = e.local.numel() * e.local.element_size()
                if bucket and size + nbytes > cap:
                    self.buckets.append(bucket)
                    bucket, size = [], 0
                bucket.append(e)
                size += nbytes
            if bucket:
                self.buckets.append(bucket)

    @torch.no_grad()
    def reduce(self) -> None:
        """Reduce every bucket now (after backward), in bucket order."""
        for i in range(len(self.buckets)):
            drive(self.bucket_steps(i))

    def bucket_steps(self, i: int) -> Steps:
        """Bucket i's reduction as steps (grad_overlap.BucketLauncher issues it from a gradient hook): flatten
        the gradients as they are now, reduce, and write the sums back as the parameters' gradients."""
        bucket = self.buckets[i]
        grads = [e.local_grad() for e in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])
        local = CommStats()
        out = yield from reduce_flat_steps(flat, bucket[0].axes, bucket[0].precision, local)
        self.account(bucket, local)
        offset = 0
        for e, g in zip(bucket, grads):
            k = g.numel()
            e.set_grad(out[offset:offset + k].view_as(e.local).to(e.local.dtype).clone())
            offset += k

    def account(self, bucket: list[GradEntry], local: CommStats) -> None:
        """Split a bucket's bytes among the ops whose parameters it carries, by element count."""
        sizes: dict[str, int] = {}
        for e in bucket:
            sizes[e.op] = sizes.get(e.op, 0) + e.local.numel()
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

"""Collectives on one mesh axis: raw calls that count what this rank sends, and their autograd Functions.

The gradient convention every backward here follows, on one mesh axis:
  - a Shard(d) value has a Shard(d) gradient (each rank holds the gradient of its own shard);
  - a Partial value has a Replicate gradient (each summand moves the sum one-for-one, so each rank needs all of
    the sum's gradient);
  - a Replicate value has a Partial gradient (the ranks' gradients sum to the true one).
The last rule is the trap a replicated value sets: its consumers may be column-parallel (each rank's backward
naturally yields a summand) or redundant ("replicate"/"seq" compute, whose backward is linear in the incoming
gradient and so turns a Partial output gradient into a Partial input gradient). Seeding the loss gradient on
one rank only (`seed_grad`) makes both cases sums, so all_gather's backward is always a reduce_scatter and
a local slice's backward is a free zero-pad, never an all_gather.

Precision: a channel's precision ("fp32" = the tensor's own dtype, "bf16", "fp8") is the wire format
(compression.py). Data movement encodes before and decodes after; a reduction becomes an all-to-all of
low-precision chunks and a float32 local sum (docs/reference.md, "Communication compression"), so nothing is ever
accumulated in low precision. FP8 is E4M3 with per-token scales in the forward; an all-gather in the backward
(the gradient of an FP8 reduce-scatter) uses per-channel scales over groups of 128 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.autograd import Function

from .comm_stats import BWD, FWD, CommStats, Key
from .compression import decode, encode
from .process_groups import AxisGroup


@dataclass(frozen=True)
class Channel:
    """Where a collective runs (an axis group) and how it is booked (op, tag) and encoded (precision)."""

    group: AxisGroup
    op: str = ""
    tag: str = ""
    precision: str = "fp32"
    stats: CommStats | None = None

    @property
    def n(self) -> int:
        return self.group.size

    def record(self, kind: str, phase: str, nbytes: float) -> None:
        if self.stats is not None:
            self.stats.add(Key(kind, self.op, self.tag, phase, self.group.name), round(nbytes))

    def with_precision(self, precision: str) -> "Channel":
        return Channel(self.group, self.op, self.tag, precision, self.stats)


# ---- raw collectives on flat, contiguous buffers -------------------------------------------------------
def _ag_raw(t: torch.Tensor, ch: Channel, phase: str) -> torch.Tensor:
    """[*shape] -> [n, *shape]: every rank's tensor, in coordinate order."""
    t = t.contiguous()
    out = t.new_empty((ch.n, *t.shape))
    if t.numel():
        ch.group.pg._allgather_base(out.view(-1), t.view(-1)).wait()
    ch.record("all_gather", phase, (ch.n - 1) * t.nbytes)
    return out


def issue_a2a(t: torch.Tensor, ch: Channel, phase: str):
    """Start [n, *chunk] -> [n, *chunk] (row j to rank j) and book its bytes: (result buffer, Work or None). The
    buffer is filled in by the collective: read it only after the Work's wait()."""
    t = t.contiguous()
    out = torch.empty_like(t)
    work = ch.group.pg.alltoall_base(out, t, [], [], dist.AllToAllOptions()) if t.numel() else None
    ch.record("all_to_all", phase, t.nbytes * (ch.n - 1) / ch.n)
    return out, work


def issue_a2a_single(t: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel, phase: str):
    """Start the uneven all-to-all of rows (in_splits[j] rows to rank j, out_splits[j] from it) and book its
    bytes: (result buffer, Work)."""
    t = t.contiguous()
    out = t.new_empty((sum(out_splits), *t.shape[1:]))
    work = ch.group.pg.alltoall_base(out, t, list(out_splits), list(in_splits), dist.AllToAllOptions())
    row = t[0:1].nbytes if t.dim() > 1 else t.element_size()
    ch.record("all_to_all", phase, (sum(in_splits) - in_splits[ch.group.index]) * row)
    return out, work


def _a2a_raw(t: torch.Tensor, ch: Channel, phase: str) -> torch.Tensor:
    """[n, *chunk] -> [n, *chunk]: row j goes to rank j; row j of the result came from rank j."""
    out, work = issue_a2a(t, ch, phase)
    if work is not None:
        work.wait()
    return out


def _a2a_single_raw(t: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel,
                    phase: str) -> torch.Tensor:
    out, work = issue_a2a_single(t, out_splits, in_splits, ch, phase)
    work.wait()
    return out


# ---- wire formats (compression.py) -----------------------------------------------------------------------
def _move(x: torch.Tensor, ch: Channel, fn: Callable[[torch.Tensor], torch.Tensor], layout: str | None,
          out_dtype: torch.dtype | None = None, stacked: bool = False) -> torch.Tensor:
    """Apply a data-movement collective `fn` to x in the channel's wire format (every part: codes and scales
    travel the same way), and decode what arrived."""
    parts, how = encode(x, ch.precision, layout)
    return decode([fn(p) for p in parts], how, out_dtype or x.dtype, stacked)


def _row(ok: bool) -> str | None:
    return "row" if ok else None


def _check_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise RuntimeError(f"{what}: dimension {dim} of size {x.shape[dim]} does not split evenly over {n} ranks "
                           f"(shape {tuple(x.shape)})")


# ---- collectives (not differentiable) --------------------------------------------------------------------
def all_gather(x: torch.Tensor, dim: int, ch: Channel, phase: str = FWD, rows_only: bool = False) -> torch.Tensor:
    """rows_only: per-row fp8 scales even in the backward (for flat buffers, which have no token dim)."""
    if ch.n == 1:
        return x
    dim %= x.dim()
    layout = "block" if phase == BWD and not rows_only else _row(dim != x.dim() - 1)
    stacked = _move(x, ch, lambda t: _ag_raw(t, ch, phase), layout, stacked=True)
    return torch.cat(stacked.unbind(0), dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, ch: Channel, phase: str = FWD) -> torch.Tensor:
    if ch.n == 1:
        return x
    dim %= x.dim()
    _check_divisible(x, dim, ch.n, f"reduce_scatter for {ch.op}")
    chunks = torch.stack(x.chunk(ch.n, dim)).contiguous()  # [n, *chunk]
    if ch.precision == "fp32" or not x.is_floating_point():
        out = chunks.new_empty(chunks.shape[1:])
        if out.numel():
            opts = dist.ReduceScatterOptions()
            ch.group.pg._reduce_scatter_base(out.view(-1), chunks.view(-1), opts).wait()
        ch.record("reduce_scatter", phase, chunks.nbytes * (ch.n - 1) / ch.n)
        return out
    recv = _move(chunks, ch, lambda t: _a2a_raw(t, ch, phase), _row(dim != x.dim() - 1), out_dtype=torch.float32)
    return recv.sum(0).to(x.dtype)


def all_reduce(x: torch.Tensor, ch: Channel, phase: str = FWD) -> torch.Tensor:
    if ch.n == 1:
        return x
    if ch.precision == "fp32" or not x.is_floating_point():
        out = x.contiguous().clone()
        if out.numel():
            ch.group.pg.allreduce([out]).wait()
        ch.record("all_reduce", phase, 2 * out.nbytes * (ch.n - 1) / ch.n)
        return out
    flat = x.reshape(-1)
    pad = (-flat.numel()) % ch.n
    flat = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    full = all_gather(reduce_scatter(flat.view(ch.n, -1), 0, ch, phase), 0, ch, phase, rows_only=True).reshape(-1)
    return full[: x.numel()].view(x.shape)


def all_to_all(x: torch.Tensor, split_dim: int, cat_dim: int, ch: Channel, phase: str = FWD) -> torch.Tensor:
    """Split x along split_dim, send chunk j to rank j, concatenate what arrives along cat_dim (source order)."""
    if ch.n == 1:
        return x
    split_dim, cat_dim = split_dim % x.dim(), cat_dim % x.dim()
    _check_divisible(x, split_dim, ch.n, f"all_to_all for {ch.op}")
    chunks = torch.stack(x.chunk(ch.n, split_dim))
    last = x.dim() - 1
    recv = _move(chunks, ch, lambda t: _a2a_raw(t, ch, phase), _row(last not in (split_dim, cat_dim)))
    return torch.cat(recv.unbind(0), dim=cat_dim)


def all_to_all_single(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel,
                      phase: str = FWD) -> torch.Tensor:
    """Uneven all-to-all of rows: in_splits[j] rows of x go to rank j, out_splits[j] rows arrive from rank j."""
    if ch.n == 1:
        return x
    return _move(x, ch, lambda t: _a2a_single_raw(t, out_splits, in_splits, ch, phase), _row(x.dim() >= 2))


def local_chunk(x: torch.Tensor, dim: int, n: int, index: int) -> torch.Tensor:
    if n == 1:
        return x
    _check_divisible(x, dim, n, "slice")
    return x.chunk(n, dim)[index]


# ---- autograd Functions -----------------------------------------------------------------------------------
class _AllGather(Function):  # S(d) -> R ; gradient P -> S(d)
    @staticmethod
    def forward(ctx, x, dim, ch):
        ctx.dim, ctx.ch = dim, ch
        return all_gather(x, dim, ch, FWD)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.dim, ctx.ch, BWD), None, None


class _ReduceScatter(Function):  # P -> S(d) ; gradient S(d) -> R
    @staticmethod
    def forward(ctx, x, dim, ch):
        ctx.dim, ctx.ch = dim, ch
        return reduce_scatter(x, dim, ch, FWD)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.ch, BWD), None, None


class _AllReduce(Function):  # P -> R ; gradient P -> R
    @staticmethod
    def forward(ctx, x, ch):
        ctx.ch = ch
        return all_reduce(x, ch, FWD)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.ch, BWD), None


class _AllToAll(Function):  # S(i) -> S(j) ; gradient the reverse all-to-all
    @staticmethod
    def forward(ctx, x, split_dim, cat_dim, ch):
        ctx.dims, ctx.ch = (split_dim, cat_dim), ch
        return all_to_all(x, split_dim, cat_dim, ch, FWD)

    @staticmethod
    def backward(ctx, g):
        split_dim, cat_dim = ctx.dims
        return all_to_all(g, cat_dim, split_dim, ctx.ch, BWD), None, None, None


class _AllToAllSingle(Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, ch):
        ctx.splits, ctx.ch = (out_splits, in_splits), ch
        return all_to_all_single(x, out_splits, in_splits, ch, FWD)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return all_to_all_single(g, in_splits, out_splits, ctx.ch, BWD), None, None, None


class _Slice(Function):  # R -> S(d), local ; gradient S(d) -> P by zero-padding (free)
    @staticmethod
    def forward(ctx, x, dim, n, index):
        ctx.meta = (x.shape, dim, n, index)
        return local_chunk(x, dim, n, index).clone()

    @staticmethod
    def backward(ctx, g):
        shape, dim, n, index = ctx.meta
        full = g.new_zeros(shape)
        local_chunk(full, dim, n, index).copy_(g)
        return full, None, None, None


class _SeedGrad(Function):  # identity; turns a replicated loss gradient into a Partial one (kept on one rank)
    @staticmethod
    def forward(ctx, x, keep):
        ctx.keep = keep
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g if ctx.keep else torch.zeros_like(g)), None


def gather_shards(x: torch.Tensor, dim: int, ch: Channel) -> torch.Tensor:
    return _AllGather.apply(x, dim, ch) if ch.n > 1 else x


def scatter_partial(x: torch.Tensor, dim: int, ch: Channel) -> torch.Tensor:
    return _ReduceScatter.apply(x, dim, ch) if ch.n > 1 else x


def sum_partial(x: torch.Tensor, ch: Channel) -> torch.Tensor:
    return _AllReduce.apply(x, ch) if ch.n > 1 else x


def exchange(x: torch.Tensor, split_dim: int, cat_dim: int, ch: Channel) -> torch.Tensor:
    return _AllToAll.apply(x, split_dim, cat_dim, ch) if ch.n > 1 else x


def exchange_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel) -> torch.Tensor:
    return _AllToAllSingle.apply(x, list(out_splits), list(in_splits), ch) if ch.n > 1 else x


def take_shard(x: torch.Tensor, dim: int, n: int, index: int) -> torch.Tensor:
    return _Slice.apply(x, dim, n, index) if n > 1 else x


def seed_grad(x: torch.Tensor, keep: bool) -> torch.Tensor:
    return _SeedGrad.apply(x, keep)

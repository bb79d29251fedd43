"""Collectives on one mesh axis, on torch's functional collectives (`torch.distributed._functional_collectives`).

Every collective is a funcol op on the axis group's registered name (process_groups.py): traceable by
torch.compile, asynchronous in eager (an `AsyncCollectiveTensor` that waits when first read). On top of funcol,
meshplan keeps two things: the bytes each call sends (`Channel.record`, from the static shapes; comm_stats.py) and
the wire formats of compressed channels (compression.py). A channel in the tensor's own dtype uses funcol's own
autograd (`all_gather_single_autograd`, `reduce_scatter_single_autograd`, `all_reduce`,
`all_to_all_single_autograd`, uneven splits included), whose backward formulas are exactly the convention below;
funcol's backward runs inside autograd where nothing can count it, so its bytes are booked in the forward. A
compressed channel keeps a thin autograd Function (_AllGather, ...): its backward must encode the gradient in the
backward's wire layout, which funcol's formulas do not do.

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

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed._functional_collectives as funcol
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


# ---- raw collectives (torch's functional collectives, no autograd) -------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # not t.nbytes: dynamo traces this, and the shapes are static


def _wait(t: torch.Tensor) -> torch.Tensor:
    """The finished result of a functional collective (eager: an AsyncCollectiveTensor; traced: already waited)."""
    # funcol.wait_tensor, not t.wait(): the latter returns the bare buffer, cut from the autograd graph
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _ag_raw(t: torch.Tensor, ch: Channel, phase: str) -> torch.Tensor:
    """[*shape] -> [n, *shape]: every rank's tensor, in coordinate order."""
    ch.record("all_gather", phase, (ch.n - 1) * _nbytes(t))
    if not t.numel():
        return t.new_empty((ch.n, *t.shape))
    return _wait(funcol.all_gather_single(t.contiguous().unsqueeze(0), 0, ch.group.group_name))


def issue_a2a(t: torch.Tensor, ch: Channel, phase: str) -> torch.Tensor:
    """Start [n, *chunk] -> [n, *chunk] (row j to rank j) and book its bytes. Eager: an AsyncCollectiveTensor
    that waits when first used (or at `_wait`)."""
    ch.record("all_to_all", phase, _nbytes(t) * (ch.n - 1) / ch.n)
    if not t.numel():
        return torch.empty_like(t)
    return funcol.all_to_all_single(t.contiguous(), None, None, ch.group.group_name)


def issue_a2a_single(t: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel,
                     phase: str) -> torch.Tensor:
    """Start the uneven all-to-all of rows (in_splits[j] rows to rank j, out_splits[j] from it) and book its
    bytes (what this rank does not keep)."""
    ch.record("all_to_all", phase, (sum(in_splits) - in_splits[ch.group.index]) * _row_bytes(t))
    return funcol.all_to_all_single(t.contiguous(), list(out_splits), list(in_splits), ch.group.group_name)


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _a2a_raw(t: torch.Tensor, ch: Channel, phase: str) -> torch.Tensor:
    """[n, *chunk] -> [n, *chunk]: row j goes to rank j; row j of the result came from rank j."""
    return _wait(issue_a2a(t, ch, phase))


def _a2a_single_raw(t: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel,
                    phase: str) -> torch.Tensor:
    return _wait(issue_a2a_single(t, out_splits, in_splits, ch, phase))


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
    if ch.precision == "fp32" or not x.is_floating_point():
        ch.record("reduce_scatter", phase, _nbytes(x) * (ch.n - 1) / ch.n)
        if not x.numel():
            return x.chunk(ch.n, dim)[0].clone()
        return _wait(funcol.reduce_scatter_single(x.contiguous(), "sum", dim, ch.group.group_name))
    chunks = torch.stack(x.chunk(ch.n, dim)).contiguous()  # [n, *chunk]
    recv = _move(chunks, ch, lambda t: _a2a_raw(t, ch, phase), _row(dim != x.dim() - 1), out_dtype=torch.float32)
    return recv.sum(0).to(x.dtype)


def all_reduce(x: torch.Tensor, ch: Channel, phase: str = FWD) -> torch.Tensor:
    if ch.n == 1:
        return x
    if ch.precision == "fp32" or not x.is_floating_point():
        ch.record("all_reduce", phase, 2 * _nbytes(x) * (ch.n - 1) / ch.n)
        if not x.numel():
            return x.clone()
        return _wait(funcol.all_reduce(x.contiguous(), "sum", ch.group.group_name))
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


# ---- autograd Functions of compressed channels (and empty tensors) ----------------------------------------
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


# ---- differentiable collectives: funcol's autograd in the tensor's own dtype, the Functions above otherwise --
def _native(x: torch.Tensor, ch: Channel) -> bool:
    """Whether the channel moves x as is, so torch's own autograd formulas apply (they match the convention at the
    top of this file: all_gather <-> reduce_scatter, all_reduce -> all_reduce, all_to_all -> the reverse)."""
    return (ch.precision == "fp32" or not x.is_floating_point()) and x.numel() > 0


def _book_backward(x: torch.Tensor, ch: Channel, kind: str, nbytes: float) -> None:
    """funcol's backward runs inside autograd, where nothing can count it: its bytes are booked now, from the
    (static) shapes, when a backward will run through this collective."""
    if torch.is_grad_enabled() and x.requires_grad:
        ch.record(kind, BWD, nbytes)


def gather_shards(x: torch.Tensor, dim: int, ch: Channel) -> torch.Tensor:
    if ch.n == 1:
        return x
    if not _native(x, ch):
        return _AllGather.apply(x, dim, ch)
    ch.record("all_gather", FWD, (ch.n - 1) * _nbytes(x))
    _book_backward(x, ch, "reduce_scatter", (ch.n - 1) * _nbytes(x))
    return _wait(funcol.all_gather_single_autograd(x.contiguous(), dim % x.dim(), ch.group.group_name))


def scatter_partial(x: torch.Tensor, dim: int, ch: Channel) -> torch.Tensor:
    if ch.n == 1:
        return x
    if not _native(x, ch):
        return _ReduceScatter.apply(x, dim, ch)
    dim %= x.dim()
    _check_divisible(x, dim, ch.n, f"reduce_scatter for {ch.op}")
    ch.record("reduce_scatter", FWD, _nbytes(x) * (ch.n - 1) / ch.n)
    _book_backward(x, ch, "all_gather", _nbytes(x) * (ch.n - 1) / ch.n)
    return _wait(funcol.reduce_scatter_single_autograd(x.contiguous(), "sum", dim, ch.group.group_name))


def sum_partial(x: torch.Tensor, ch: Channel) -> torch.Tensor:
    if ch.n == 1:
        return x
    if not _native(x, ch):
        return _AllReduce.apply(x, ch)
    ch.record("all_reduce", FWD, 2 * _nbytes(x) * (ch.n - 1) / ch.n)
    _book_backward(x, ch, "all_reduce", 2 * _nbytes(x) * (ch.n - 1) / ch.n)
    return _wait(funcol.all_reduce(x.contiguous(), "sum", ch.group.group_name))


def exchange(x: torch.Tensor, split_dim: int, cat_dim: int, ch: Channel) -> torch.Tensor:
    if ch.n == 1:
        return x
    if not _native(x, ch):
        return _AllToAll.apply(x, split_dim, cat_dim, ch)
    split_dim, cat_dim = split_dim % x.dim(), cat_dim % x.dim()
    _check_divisible(x, split_dim, ch.n, f"all_to_all for {ch.op}")
    chunks = torch.stack(x.chunk(ch.n, split_dim))  # [n, *chunk]: row j goes to rank j
    ch.record("all_to_all", FWD, _nbytes(x) * (ch.n - 1) / ch.n)
    _book_backward(x, ch, "all_to_all", _nbytes(x) * (ch.n - 1) / ch.n)
    recv = _wait(funcol.all_to_all_single_autograd(chunks, None, None, ch.group.group_name))
    return torch.cat(recv.unbind(0), dim=cat_dim)


def exchange_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel) -> torch.Tensor:
    if ch.n == 1:
        return x
    out_splits, in_splits = list(out_splits), list(in_splits)
    if ch.precision != "fp32" and x.is_floating_point():  # no numel() test: under compile the rows are data-dependent
        return _AllToAllSingle.apply(x, out_splits, in_splits, ch)
    me = ch.group.index
    ch.record("all_to_all", FWD, (sum(in_splits) - in_splits[me]) * _row_bytes(x))
    _book_backward(x, ch, "all_to_all", (sum(out_splits) - out_splits[me]) * _row_bytes(x))
    return _wait(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, ch.group.group_name))


def take_shard(x: torch.Tensor, dim: int, n: int, index: int) -> torch.Tensor:
    return _Slice.apply(x, dim, n, index) if n > 1 else x


def seed_grad(x: torch.Tensor, keep: bool) -> torch.Tensor:
    return _SeedGrad.apply(x, keep)

"""Asynchronous all-to-alls for the emitted overlap code: issue now, wait just before the result is first used.

`start_exchange` / `start_rows` issue the collective (`async_op`: gloo's ProcessGroup returns a Work without
blocking; on CUDA, NCCL runs it on its own stream and `wait()` makes the current stream wait on its event, so
the host never blocks) and return a `Pending`; `Pending.wait()` blocks until the bytes have arrived and hands back
the result. Between the two the caller computes another chunk: that is the whole overlap mechanism.

CUDA streams: given the rank's comm stream (ParallelModel.comm_stream, which the emitted code passes), the
collective and the layout copy in front of it are enqueued on that stream after it waits for the compute stream
(the producer of the input); `wait()` then makes the compute stream wait for the comm stream and marks the
buffers as used by both streams (`record_stream`), so the caching allocator reuses neither too early. Autograd
runs each Function's backward on the stream its forward ran on, so the mirror all-to-all of the backward goes to
the comm stream as well, with the engine's own stream synchronisation.

Autograd: the forward is asynchronous; the backward is the mirror all-to-all of collectives.py, synchronous (the
autograd engine runs it when the gradient arrives). So overlap covers the forward only; the backward is correct
but sequential. Bytes are booked with the same formulas and Channel.record as collectives.py, so a step's
CommStats are identical with and without overlap.

Only the "fp32" wire format goes asynchronous: a compressed channel (bf16/fp8) needs its decode after the wait,
which collectives.py does inside a synchronous call, so for those `start_*` runs the synchronous collective and
returns an already-finished Pending (correct, not overlapped).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

from .collectives import Channel, all_to_all, all_to_all_single, exchange, exchange_rows
from .comm_stats import BWD, FWD


class Pending:
    """A collective in flight: `wait()` returns its result (once, or again: the result is kept)."""

    def __init__(self, value: torch.Tensor, work=None, finish=None, stream=None, keep=()):
        self._value, self._work, self._finish = value, work, finish
        self._stream, self._keep = stream, keep  # the comm stream, and tensors it reads or writes

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._stream is not None:
                current = torch.cuda.current_stream(self._stream.device)
                current.wait_stream(self._stream)
                for t in (self._value, *self._keep):
                    t.record_stream(current)
                self._keep = ()
            if self._finish is not None:
                self._value = self._finish(self._value)
        return self._value

    @property
    def done(self) -> bool:
        return self._work is None


class _StartAllToAll(Function):
    """[n, *chunk] -> [n, *chunk] (row j to rank j), issued asynchronously; `holder` receives the Work.
    The returned tensor is filled in by the collective: read it only after the Work's wait()."""

    @staticmethod
    def forward(ctx, t, ch: Channel, holder: list):
        ctx.ch = ch
        t = t.contiguous()
        out = torch.empty_like(t)
        holder.append(ch.group.pg.alltoall_base(out, t, [], [], dist.AllToAllOptions()) if t.numel() else None)
        ch.record("all_to_all", FWD, t.nbytes * (ch.n - 1) / ch.n)  # as collectives._a2a_raw
        return out

    @staticmethod
    def backward(ctx, g):
        # The stacked layout is its own inverse: row j of the gradient goes back to rank j.
        return all_to_all(g.contiguous(), 0, 0, ctx.ch, BWD), None, None


class _StartRows(Function):
    """Uneven all-to-all of rows, issued asynchronously (in_splits[j] rows to rank j, out_splits[j] from it)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], ch: Channel, holder: list):
        ctx.splits, ctx.ch = (out_splits, in_splits), ch
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        holder.append(ch.group.pg.alltoall_base(out, x, list(out_splits), list(in_splits), dist.AllToAllOptions()))
        row = x[0:1].nbytes if x.dim() > 1 else x.element_size()
        ch.record("all_to_all", FWD, (sum(in_splits) - in_splits[ch.group.index]) * row)  # as _a2a_single_raw
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return all_to_all_single(g.contiguous(), in_splits, out_splits, ctx.ch, BWD), None, None, None, None


def _comm_stream(stream, x: torch.Tensor):
    """The stream to enqueue x's collective on, once it has waited for the current (producing) stream; None off
    CUDA or when no comm stream is given (torch.cuda.stream(None) is then a no-op)."""
    if stream is None or not x.is_cuda:
        return None
    stream.wait_stream(torch.cuda.current_stream(x.device))
    return stream


def start_exchange(x: torch.Tensor, split_dim: int, cat_dim: int, ch: Channel, stream=None) -> Pending:
    """Asynchronous collectives.exchange: split x along split_dim, chunk j to rank j, concatenate what arrives
    along cat_dim (in source order). `stream`: the CUDA comm stream to issue it on (None: the current one)."""
    if ch.n == 1:
        return Pending(x)
    if ch.precision != "fp32":
        return Pending(exchange(x, split_dim, cat_dim, ch))
    split_dim, cat_dim = split_dim % x.dim(), cat_dim % x.dim()
    if x.shape[split_dim] % ch.n:
        raise RuntimeError(f"all_to_all for {ch.op}: dimension {split_dim} of size {x.shape[split_dim]} does not "
                           f"split evenly over {ch.n} ranks (shape {tuple(x.shape)})")
    holder: list = []
    s = _comm_stream(stream, x)
    with torch.cuda.stream(s):
        stacked = torch.stack(x.chunk(ch.n, split_dim))
        out = _StartAllToAll.apply(stacked, ch, holder)
    if holder[0] is None:
        return Pending(torch.cat(out.unbind(0), dim=cat_dim))
    return Pending(out, holder[0], lambda t: torch.cat(t.unbind(0), dim=cat_dim), s, (x, stacked) if s else ())


def start_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel, stream=None) -> Pending:
    """Asynchronous collectives.exchange_rows (the uneven all-to-all of MoE dispatch and combine)."""
    if ch.n == 1:
        return Pending(x)
    if ch.precision != "fp32":
        return Pending(exchange_rows(x, out_splits, in_splits, ch))
    holder: list = []
    s = _comm_stream(stream, x)
    with torch.cuda.stream(s):
        out = _StartRows.apply(x, list(out_splits), list(in_splits), ch, holder)
    return Pending(out, holder[0], stream=s, keep=(x,) if s else ())

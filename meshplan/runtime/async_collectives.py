"""Asynchronous all-to-alls for the emitted overlap code: issue now, wait just before the result is first used.

`start_exchange` / `start_rows` issue the collective (torch's functional all_to_all_single, which returns an
`AsyncCollectiveTensor` without blocking; on CUDA, NCCL runs it on its own stream and `wait_tensor` makes the
current stream wait on its event, so the host never blocks) and return a `Pending`; `Pending.wait()` waits until
the bytes have arrived (`wait_tensor`) and hands back the result. Between the two the caller computes another
chunk: that is the whole overlap mechanism.

CUDA streams: given the rank's comm stream (ParallelModel.comm_stream, which the emitted code passes), the
collective and the layout copy in front of it are enqueued on that stream after it waits for the compute stream
(the producer of the input); `wait()` then makes the compute stream wait for the comm stream and marks the
buffers as used by both streams (`record_stream`), so the caching allocator reuses neither too early.

Autograd: funcol's own backward of all_to_all_single issues the mirror collective and waits for it at once, which
would serialise the backward; so each started collective is a pair of thin Functions, the start (issue) and
`_Arrive` (applied where `wait()` hands the result to compute). Backward runs them in the other order:
`_Arrive`'s backward, the first to see the gradient, issues the mirror all-to-all asynchronously; the start's
backward, which autograd runs later, waits for it. Autograd visits ready nodes latest-created first, so with the
chunks interleaved in the forward, other chunks' backward compute runs between the two, and the backward overlaps
too (on CUDA autograd runs each backward on its forward's stream: the issue on the compute stream, the wait on the
comm stream, with the engine's stream syncs).
Collectives are issued and their bytes booked by collectives.py's issue_a2a / issue_a2a_single, so a step's
CommStats are identical with and without overlap.

Only the "fp32" wire format goes asynchronous: a compressed channel (bf16/fp8) needs its decode after the wait,
which collectives.py does inside a synchronous call, so for those `start_*` runs the synchronous collective and
returns an already-finished Pending (correct, not overlapped).
"""
from __future__ import annotations

import threading

import torch
from torch.autograd import Function
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from .collectives import Channel, _wait, exchange, exchange_rows, issue_a2a, issue_a2a_single
from .comm_stats import BWD, FWD


class _Mirror:
    """The backward all-to-all of one forward collective, shared by the pair of Functions around it: _Arrive's
    backward (the first to see the gradient) issues it, the start Function's backward (which autograd runs later,
    possibly after other chunks' backward) waits for it."""

    def __init__(self, ch: Channel, splits: tuple[list[int], list[int]] | None):
        self.ch, self.splits = ch, splits  # splits: (forward out_splits, in_splits) for rows; None: even layout
        self.buf = None

    def issue(self, g: torch.Tensor) -> None:
        if self.splits is None:  # the stacked [n, *chunk] layout is its own inverse
            self.buf = issue_a2a(g, self.ch, BWD)
        else:  # rows go back the way they came: the forward's in_splits arrive, its out_splits leave
            out_splits, in_splits = self.splits
            self.buf = issue_a2a_single(g, in_splits, out_splits, self.ch, BWD)
        _trace("issue", self)

    def result(self) -> torch.Tensor:
        _trace("wait", self)
        self.buf = _wait(self.buf)
        return self.buf


# Set to a list to record ("issue" | "wait", thread id, mirror id) for every backward all-to-all, in order: how
# tests see the backward overlap. None (the default) records nothing.
TRACE: list[tuple[str, int, int]] | None = None


def _trace(event: str, mirror: _Mirror) -> None:
    if TRACE is not None:
        TRACE.append((event, threading.get_ident(), id(mirror)))


class _Arrive(Function):
    """Forward: the collective's result, once it has arrived (the identity on the buffer). Backward: issue the
    mirror all-to-all of the gradient asynchronously and pass the gradient on unchanged; the start Function's
    backward ignores what it receives and returns the mirror's result, once it has arrived."""

    @staticmethod
    def forward(ctx, out, mirror: _Mirror):
        ctx.mirror = mirror
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        ctx.mirror.issue(g)
        return g, None


class Pending:
    """A collective in flight: `wait()` returns its result (once, or again: the result is kept)."""

    def __init__(self, value: torch.Tensor, held=None, finish=None, stream=None, keep=(), mirror=None):
        # held: the in-flight AsyncCollectiveTensor whose buffer `value` is (autograd's view of it)
        self._value, self._held, self._finish = value, held, finish
        self._stream, self._keep = stream, keep  # the comm stream, and tensors it reads or writes
        self._mirror = mirror

    def wait(self) -> torch.Tensor:
        if self._held is not None or self._mirror is not None:
            if self._held is not None:
                _wait(self._held)  # wait_tensor on the buffer `value` reads
            self._held = None
            if self._stream is not None:
                current = torch.cuda.current_stream(self._stream.device)
                current.wait_stream(self._stream)
                for t in (self._value, *self._keep):
                    t.record_stream(current)
                self._keep = ()
            if self._mirror is not None and self._value.requires_grad:
                self._value = _Arrive.apply(self._value, self._mirror)
            self._mirror = None
            if self._finish is not None:
                self._value = self._finish(self._value)
        return self._value

    @property
    def done(self) -> bool:
        return self._held is None


class _StartAllToAll(Function):
    """[n, *chunk] -> [n, *chunk] (row j to rank j), issued asynchronously; `holder` receives the in-flight
    AsyncCollectiveTensor (autograd sees the plain tensor under it: read it only after the holder's wait)."""

    @staticmethod
    def forward(ctx, t, ch: Channel, holder: list, mirror: _Mirror):
        ctx.mirror = mirror
        return _hold(issue_a2a(t, ch, FWD), holder)

    @staticmethod
    def backward(ctx, g):
        return ctx.mirror.result(), None, None, None


class _StartRows(Function):
    """Uneven all-to-all of rows, issued asynchronously (in_splits[j] rows to rank j, out_splits[j] from it)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], ch: Channel, holder: list, mirror: _Mirror):
        ctx.mirror = mirror
        return _hold(issue_a2a_single(x, out_splits, in_splits, ch, FWD), holder)

    @staticmethod
    def backward(ctx, g):
        return ctx.mirror.result(), None, None, None, None, None


def _hold(result: torch.Tensor, holder: list) -> torch.Tensor:
    """Keep the in-flight collective in `holder` and hand autograd the buffer it fills (a Function may not return
    a tensor subclass that waits on first use: autograd would read it at once)."""
    holder.append(result)
    return result.elem if isinstance(result, AsyncCollectiveTensor) else result


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
    mirror = _Mirror(ch, None)
    with torch.cuda.stream(s):
        stacked = torch.stack(x.chunk(ch.n, split_dim))
        out = _StartAllToAll.apply(stacked, ch, holder, mirror)
    return Pending(out, holder[0], lambda t: torch.cat(t.unbind(0), dim=cat_dim), s,
                   (x, stacked) if s else (), mirror)


def start_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ch: Channel, stream=None) -> Pending:
    """Asynchronous collectives.exchange_rows (the uneven all-to-all of MoE dispatch and combine)."""
    if ch.n == 1:
        return Pending(x)
    if ch.precision != "fp32":
        return Pending(exchange_rows(x, out_splits, in_splits, ch))
    holder: list = []
    s = _comm_stream(stream, x)
    mirror = _Mirror(ch, (list(out_splits), list(in_splits)))
    with torch.cuda.stream(s):
        out = _StartRows.apply(x, list(out_splits), list(in_splits), ch, holder, mirror)
    return Pending(out, holder[0], stream=s, keep=(x,) if s else (), mirror=mirror)

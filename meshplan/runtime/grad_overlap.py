"""Gradient reduction overlapped with the backward: each bucket's collective is issued from a gradient hook as
soon as every gradient in it has been accumulated, as torch DDP's reducer and Megatron-Core's
DistributedDataParallel(overlap_grad_reduce=True) do, and the step's reduce_gradients() only waits.

A bucket's reduction is written once, as steps (a generator: data_parallel.reduce_flat_steps, zero._Bucket): it
builds the flat buffer from the gradients as they are, issues its first collective and yields it in flight
(funcol: an AsyncCollectiveTensor, run by the process group's own thread on gloo or stream on NCCL); sent the
waited result, it finishes the reduction synchronously (the later hops of a hierarchical or bf16 reduction) and
writes the sums back. `drive` runs the steps at once (the post-backward reduction); `BucketLauncher` starts them
from `register_post_accumulate_grad_hook` and finishes them in `finish()`. Same buckets, same collectives, same
order of summation: the result is bit-identical to the post-backward reduction (tests/runtime/test_grad_overlap.py).

Order: buckets are issued strictly in bucket order (last layers first: the order the backward produces their
gradients), a bucket only when all before it are issued, so every rank of a group issues the same collectives in
the same sequence whatever the timing. A gradient that never arrives (a parameter that does not reach the loss)
holds its bucket and those after it until finish(), which issues them in the same order. Parameters that cannot
get a gradient (no op reads them, requires_grad=False) are not waited for: their gradient is zero.

Gradient accumulation: the hooks fire on every backward. The launcher issues only while armed (the default);
earlier micro-batches run under `ParallelModel.no_grad_sync()` (DDP's `no_sync`). A gradient accumulated again
after its bucket was issued is an error, never a silently stale sum. Pipeline schedules call backward per
micro-batch and stage: `meshplan run` keeps the post-backward reduction for pipeline plans.
"""
from __future__ import annotations

from collections.abc import Callable, Generator

import torch

from .collectives import _wait

Steps = Generator[torch.Tensor, torch.Tensor, object]


def drive(steps: Steps, pending: torch.Tensor | None = None, started: bool = False):
    """Run `steps` to the end (from its start, or from `pending`, what it yielded when started) and return its
    result."""
    try:
        if not started:
            pending = next(steps)
        while True:
            pending = steps.send(_wait(pending))
    except StopIteration as done:
        return done.value


def launch_list(buckets) -> list[list[tuple[str, torch.Tensor, bool]]]:
    """BucketLauncher's view of GradEntry buckets: a gradient is waited for when some op reads the parameter
    (GradEntry.op: "" for the parameters no op uses) and it requires grad."""
    return [[(e.name, e.param, bool(e.op) and e.param.requires_grad) for e in b] for b in buckets]


class BucketLauncher:
    """Issues bucket i's steps (`steps(i)`) from the post-accumulate-grad hooks of its parameters.

    buckets: per bucket, its parameters (nn.Parameter / DTensor leaves) and whether each must be waited for.
    trace, when a list, records ("issue", i) / ("wait", i) / ("grad", name) events in order (tests).
    """

    def __init__(self, buckets: list[list[tuple[str, torch.Tensor, bool]]], steps: Callable[[int], Steps]):
        self._steps = steps
        self._buckets = buckets
        self._where: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._hooks = []
        self.armed = True
        self.trace: list[tuple[str, object]] | None = None
        for i, bucket in enumerate(buckets):
            for name, p, wait in bucket:
                if wait and id(p) not in self._where:
                    self._where[id(p)] = i
                    self._names[id(p)] = name
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
        self._reset()

    def _reset(self) -> None:
        self._left = [{id(p) for _, p, wait in b if wait} for b in self._buckets]
        self._inflight: list[tuple[Steps, torch.Tensor | None, bool]] = []  # issued, in order
        self._next = 0

    def _hook(self, p: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace.append(("grad", self._names[id(p)]))
        if not self.armed:
            return
        i = self._where[id(p)]
        if i < self._next:
            raise RuntimeError(f"gradient of {self._names[id(p)]} accumulated again after its bucket's reduction "
                               f"was issued: run the earlier micro-batches' backward under pm.no_grad_sync(), "
                               f"and call reduce_gradients() before the next backward")
        self._left[i].discard(id(p))
        self._issue_ready()

    @torch.no_grad()
    def _issue_ready(self) -> None:
        while self._next < len(self._buckets) and not self._left[self._next]:
            self._issue(self._next)

    def _issue(self, i: int) -> None:
        steps = self._steps(i)
        try:
            self._inflight.append((steps, next(steps), True))
        except StopIteration:  # finished without a collective in flight
            self._inflight.append((steps, None, False))
        if self.trace is not None:
            self.trace.append(("issue", i))
        self._next = i + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Issue the buckets still waiting (in order), wait for every one and write the results back."""
        try:
            while self._next < len(self._buckets):
                self._issue(self._next)
            for i, (steps, pending, running) in enumerate(self._inflight):
                if running:
                    drive(steps, pending, started=True)
                if self.trace is not None:
                    self.trace.append(("wait", i))
        finally:
            self._reset()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

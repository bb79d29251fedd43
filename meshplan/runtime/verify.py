"""`compile(..., verify=True)`: one training step of the compiled model against the single-device model.

Every rank runs the original model (it must fit on one rank) and the compiled one on the same small batch, with a
loss that weighs every output element differently (so every gradient is exercised), and compares the loss and
every parameter's gradient. On a mismatch it gathers each op's output in graph order and names the first op
whose value differs from the single-device value — the place to look — before training starts.

Tolerances are relative to each tensor's largest magnitude: an fp32 plan must match to 1e-4 (reassociated sums
differ in the last bits, nothing more); a plan with compressed collectives, or a bf16/fp16 model, to the
rounding of its narrowest format (bf16 2^-8 per rounding, FP8 E4M3 2^-4; a handful of roundings compound).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..ir import graph as G
from ..ir.placement import Replicate, Shard
from ..ir.plan import PlanError
from ..ir.strategies import layout_error
from .device_mesh import local_tensor
from .redistribute import redistribute

# Relative tolerance by the narrowest format a plan moves or computes in (see the module docstring).
TOLERANCE = {"fp32": 1e-4, "float32": 1e-4, "float64": 1e-4, "bf16": 5e-2, "bfloat16": 5e-2, "float16": 1e-2,
             "fp8": 3e-1}


class PlanVerificationError(PlanError):
    """The compiled model does not compute what the single-device model computes."""


@dataclass
class VerifyReport:
    loss_error: float  # |loss - ref| / max(|ref|, 1)
    grad_error: float  # max over ranks and parameters of max|g - ref| / max|ref|
    worst_grad: str  # this rank's worst parameter
    tolerance: float
    reference_s: float  # the single-device step's wall time
    compiled_s: float  # the compiled step's wall time (forward, backward, gradient reduction, gathering grads)

    def __str__(self) -> str:
        return (f"verify: loss rel err {self.loss_error:.2e}, grads max rel err {self.grad_error:.2e} "
                f"(this rank's worst: {self.worst_grad}), tolerance {self.tolerance:.0e}; "
                f"reference step {self.reference_s:.3f} s, "
                f"compiled step {self.compiled_s:.3f} s")


def tolerance_for(plan, graph) -> float:
    """The narrowest format of the plan's collectives that move data (a precision on a 1-wide model axis sends
    nothing; gradients are reduced whenever the world has more than one rank) and of the model's activations."""
    def moves(p, collective: str) -> bool:
        return plan.mesh.size > 1 if collective == "grad" else \
            p.axis is not None and plan.mesh.axis_size(p.axis) > 1
    formats = {prec for p in plan.ops.values() for c, prec in p.precision.items() if moves(p, c)}
    formats |= {op.output.dtype for op in graph.ops() if op.output is not None and op.kind != G.INPUT}
    return max(TOLERANCE.get(f, 1e-4) for f in formats | {"fp32"})


def verify_tokens(graph, tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A batch like `tokens` with values every embedding accepts (random ids below the smallest vocabulary)."""
    if tokens.dtype.is_floating_point:
        return torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=tokens.dtype)
    vocab = min((op.attrs["num_embeddings"] for op in graph.ops() if op.kind == G.EMBEDDING), default=2)
    return torch.randint(0, vocab, tuple(tokens.shape), generator=torch.Generator().manual_seed(seed))


def small_batch(plan, graph, batch: int, seq: int) -> int:
    """The smallest batch (a divisor of `batch`) the plan runs at this sequence length: verification needs one
    sample per data-parallel shard, not the training batch."""
    from ..ir.plan import PlanError as _PlanError

    for b in (d for d in range(1, batch + 1) if batch % d == 0):
        try:
            plan.validate(graph, batch=b, seq=seq)
            return b
        except _PlanError:
            continue
    return batch


def _weights(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) + 0.5


def _loss(out: torch.Tensor) -> torch.Tensor:
    """Every element weighted differently (a uniform weight would hide a permutation), normalised."""
    w = _weights(out).to(out.device)
    return (out.float() * w).sum() / out.numel() + (out.float() ** 2).mean()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != ref.shape:
        return float("inf")
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item() if ref.numel() else 0.0


def _reference(graph, model: nn.Module, tokens: torch.Tensor, values: dict | None = None):
    """Loss and gradients of the single-device model; with `values`, also every fx node's value (its own traced
    module, run by an fx.Interpreter: slower, so only to diagnose a difference)."""
    saved = {n: p.grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    if values is None:
        out = model(tokens)
    else:
        class Recorder(fx.Interpreter):
            def run_node(self, n):
                values[n.name] = out = super().run_node(n)
                return out

        # The traced graph over *this* model's modules and weights (a cached graph's module may hold another's).
        out = Recorder(fx.GraphModule(model, graph.module.graph)).run(tokens)
    loss = _loss(out)
    loss.backward()
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = saved[n]
    return loss.item(), grads, seconds


def _gather_along(pm, x: torch.Tensor, i: int) -> torch.Tensor:
    """[size, *x.shape]: every rank's `x` along mesh axis i, in coordinate order (one all-gather)."""
    src = tuple(Shard(0) if j == i else Replicate() for j in range(len(pm.axes)))
    return redistribute(x[None], src, tuple(Replicate() for _ in pm.axes), pm.axes)


def _world_max(pm, values: list[float]) -> list[float]:
    """Element-wise maximum over every rank of the mesh (one small all-gather per axis)."""
    v = torch.tensor(values, dtype=torch.float64, device=pm.groups.device)
    for i, g in enumerate(pm.axes):
        if g.size > 1:
            v = _gather_along(pm, v, i).max(dim=0).values
    return v.cpu().tolist()


def _local_errors(pm, ref_grads: dict) -> dict[str, float]:
    """Each of this rank's gradient shards against the same slice of the reference gradient (no gathering),
    relative to the whole reference gradient's largest magnitude."""
    errs = {}
    for name, p in pm.named_parameters():
        ref = ref_grads[name].to(p.device)
        scale = ref.abs().max().clamp_min(1e-12).item() if ref.numel() else 1.0
        ref = redistribute(ref, tuple(Replicate() for _ in pm.axes), pm.placement_of(name), pm.axes)  # a slice
        grad = local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p))
        errs[name] = (grad.double() - ref.double()).abs().max().item() / scale if ref.numel() else 0.0
    return errs


def check_same_weights(pm, model: nn.Module) -> None:
    """Every rank sliced its shards from its own copy of the model: the copies must be equal (the same seed or
    checkpoint on every rank), or the replicated shards silently differ between ranks."""
    names = [n for n, _ in model.named_parameters()]
    if not names:
        return
    prints = torch.stack([_fingerprint(p) for _, p in model.named_parameters()]).to(pm.groups.device)
    for i, g in enumerate(pm.axes):
        if g.size == 1:
            continue
        every = _gather_along(pm, prints, i).cpu()
        for r in range(g.size):
            bad = (every[r] != prints.cpu()).any(dim=1).nonzero()
            if len(bad):
                raise PlanVerificationError(
                    f"the ranks' models differ: parameter {names[bad[0].item()]!r} on rank {g.ranks[r]} is not the "
                    f"one on rank {g.ranks[g.index]} (mesh axis {g.name}); build the model the same way on every "
                    f"rank (torch.manual_seed before constructing it, or load one checkpoint)")


def _fingerprint(p: torch.Tensor) -> torch.Tensor:
    """Three float64 sums (all, every other element, magnitudes): equal copies agree bit for bit, and two
    independent initialisations differ in all three."""
    x = p.detach().flatten()
    f64 = torch.float64
    return torch.stack([x.sum(dtype=f64), x[::2].sum(dtype=f64), x.abs().sum(dtype=f64)]).cpu()


def verify(pm, model: nn.Module, graph, tokens: torch.Tensor, tolerance: float | None = None) -> VerifyReport:
    """Compare one step of ParallelModel `pm` with `model` on `tokens` (call on every rank of the world)."""
    tol = tolerance if tolerance is not None else tolerance_for(pm.plan, graph)
    check_same_weights(pm, model)
    ref_loss, ref_grads, ref_s = _reference(graph, model, tokens)
    try:
        t0 = time.perf_counter()
        loss = _loss(pm(tokens))
        loss.backward()
        pm.reduce_gradients()
        par_s = time.perf_counter() - t0
        missing = sorted(set(ref_grads) - {n for n, _ in pm.named_parameters()})
        if missing:
            raise PlanVerificationError(f"the compiled model has no parameter {missing[0]!r} of the model")
        errs = _local_errors(pm, ref_grads)
        worst = max(errs, key=errs.get, default="-")
        loss_err, grad_err = _world_max(pm, [abs(loss.item() - ref_loss) / max(abs(ref_loss), 1.0),
                                             errs.get(worst, 0.0)])
        report = VerifyReport(loss_err, grad_err, worst, tol, ref_s, par_s)
        if loss_err > tol or grad_err > tol:
            raise PlanVerificationError(_diagnose(pm, graph, model, tokens, tol, report))
        return report
    finally:
        pm.record = None
        for p in pm.parameters():
            p.grad = None


def _diagnose(pm, graph, model: nn.Module, tokens: torch.Tensor, tol: float, report: VerifyReport) -> str:
    """The first op (graph order) whose gathered output differs from the single-device value: both forwards
    again, recording every op's (node's) value."""
    head = (f"the compiled model differs from the single-device model: loss rel err {report.loss_error:.2e}, "
            f"grads max rel err {report.grad_error:.2e} (this rank's worst: {report.worst_grad}; "
            f"tolerance {tol:.0e})")
    values: dict = {}
    _reference(graph, model, tokens, values)
    pm.record = {}
    with torch.no_grad():
        pm(tokens)
    for op in graph.ops():
        if op.name not in pm.record or op.node not in values:
            continue
        local, placement = pm.record[op.name]
        # A tensor without the dim a placement names (a position table under S(0)) is whole on every rank.
        placement = tuple(Replicate() if layout_error(op.output, pl) else pl for pl in placement)
        full = pm.gathered(local, placement)
        ref = values[op.node]
        if "tuple_index" in op.attrs and isinstance(ref, (tuple, list)):
            ref = ref[op.attrs["tuple_index"]]
        if not isinstance(ref, torch.Tensor):
            continue
        err = _rel(full, ref)
        if err > tol:
            p = pm.plan.ops[op.name]
            return (f"{head}; first differing op: {op.name!r} ({op.kind}, strategy {p.strategy}, output "
                    f"{', '.join(map(str, placement))}): max rel err {err:.2e}")
    return f"{head}; every op's forward output matches, so the difference is in the backward or the gradient sync"


__all__ = ["PlanVerificationError", "VerifyReport", "verify", "check_same_weights", "verify_tokens", "tolerance_for",
           "small_batch", "TOLERANCE"]

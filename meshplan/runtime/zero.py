"""ZeRO-1 over each parameter's replica group: a Megatron-style distributed AdamW.

    opt = ZeroAdamW(pm, lr=1e-3)      # pm's replicated shards (DTensors' local tensors) become views of flat buckets
    loss.backward(); opt.reduce_gradients(); clip_grad_norm_(opt.grad_pieces(), 1.0, pm.axes); opt.step()

What the planner prices (planner/memory.py, docs/reference.md "Distributed optimizer"): the AdamW state of a
parameter is sharded over every rank that holds a replica of its local shard -- the data-parallel ranks for a
parameter split on the model axis, the model axis too for one replicated on it. Per bucket of parameters with the
same replica axes: the gradients are reduce-scattered (innermost axis first, as data_parallel.py's hierarchy)
instead of all-reduced, AdamW steps on this rank's 1/D of the flat buffer, and the updated slice is all-gathered
back into the buffer the parameters are views of. The bytes equal one all-reduce; the optimizer state is 1/D.

Why not torch.distributed.optim.ZeroRedundancyOptimizer: it takes one process group for all parameters, but the
replica group differs per parameter (dp for split weights, dp x mp for replicated ones) and no process group spans
two mesh axes here; it assigns whole parameters to ranks (uneven, a 1/D bound only for many small parameters);
it all-reduces gradients first (twice the gradient bytes of a reduce-scatter); and its state dict is consolidated
on one rank rather than saved per rank. Parameters that are sharded on every axis of size > 1 have no replica:
a plain AdamW steps them locally.

pm's parameters stay DTensors: a bucket re-points the storage of each one's local tensor into its flat buffer
(the DTensor's own `_local_tensor`, the object to_local() views, so the memory is the buffer's alone), reads the
local gradients, and leaves the parameters' `grad` None after its reduce-scatter: the bucket slice is the only
gradient (grad_pieces). The unreplicated parameters are stepped as DTensors by the plain AdamW, as torchtitan's.

Checkpoints (checkpoint.py) keep the per-parameter layout: param_states() gathers each bucket's state into tensors
shaped like the local shards for the save, load_param_states() keeps this rank's slice, so a checkpoint saved with
or without ZeRO, under any plan, loads either way. The gather holds one full copy of this rank's AdamW state for
the duration of the save.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .collectives import Channel, all_gather, reduce_scatter
from .comm_stats import GRAD, CommStats
from .data_parallel import GradEntry, GradReducer, _issue_reduce_scatter
from .device_mesh import laid_out_as, local_tensor
from .executor import ParallelModel
from .grad_overlap import BucketLauncher, drive, launch_list
from .process_groups import AxisGroup

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class GradPiece:
    """A gradient this rank holds, and the axes on which other ranks hold identical copies of it (counted once,
    by the copy at coordinate 0 of each, when summing over ranks)."""

    grad: torch.Tensor
    copies: tuple[AxisGroup, ...] = ()


class _Bucket:
    """Parameters with the same replica axes in one flat buffer; this rank owns flat[lo:hi]."""

    def __init__(self, entries: list[GradEntry]):
        self.entries, self.axes, self.precision = entries, entries[0].axes, entries[0].precision
        dtypes = {e.local.dtype for e in entries}
        if len(dtypes) > 1:
            raise TypeError(f"ZeRO: parameters {[e.name for e in entries]} share replica axes but have dtypes "
                            f"{sorted(map(str, dtypes))}; one bucket holds one dtype")
        d = math.prod(g.size for g in self.axes)
        n = sum(e.local.numel() for e in entries)
        p0 = entries[0].local
        self.flat = torch.zeros(n + (-n) % d, dtype=p0.dtype, device=p0.device)
        offset = 0
        for e in entries:  # the parameters' local tensors become views of the flat buffer (same values)
            local = e.local
            k = local.numel()
            self.flat[offset:offset + k].copy_(local.detach().reshape(-1))
            local.data = self.flat[offset:offset + k].view_as(local)
            offset += k
        self.lo, size = 0, self.flat.numel()
        for g in reversed(self.axes):  # reduce-scatter order: innermost axis first
            size //= g.size
            self.lo += g.index * size
        self.hi = self.lo + size
        self.shard = nn.Parameter(self.flat[self.lo:self.hi], requires_grad=entries[0].param.requires_grad)

    def reduce_scatter(self, stats: CommStats):
        """The reduce-scatter of the bucket's gradients as steps (grad_overlap.drive): the first (innermost)
        fp32 hop is yielded in flight; a bf16 one runs synchronously (its decode follows the wait)."""
        flat = torch.cat([e.local_grad().reshape(-1) for e in self.entries])
        flat = torch.cat([flat, flat.new_zeros(self.flat.numel() - flat.numel())])
        for i, g in enumerate(reversed(self.axes)):
            ch = Channel(g, "", GRAD, self.precision, stats)
            if i == 0 and (self.precision == "fp32" or not flat.is_floating_point()):
                flat = yield _issue_reduce_scatter(flat, ch)
            else:
                flat = reduce_scatter(flat, 0, ch, GRAD)
        self.shard.grad = flat.to(self.flat.dtype)
        for e in self.entries:  # only the reduced slice is a true gradient now: nobody may read the partial sums
            e.param.grad = None

    def gather(self, t: torch.Tensor, stats: CommStats | None) -> torch.Tensor:
        """The full flat buffer from every rank's slice `t` (outermost axis first: the reduce-scatter's inverse)."""
        for g in self.axes:
            t = all_gather(t, 0, Channel(g, "", "zero_params", "fp32", stats), GRAD)
        return t

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for e in self.entries:
            k = e.local.numel()
            out[e.name] = flat[offset:offset + k].view_as(e.local)
            offset += k
        return out


class ZeroAdamW:
    """AdamW over pm's parameters with its state sharded over each parameter's replica group (see the module
    docstring). reduce_gradients() replaces pm.reduce_gradients(); step() updates every rank's parameters."""

    def __init__(self, pm: ParallelModel, lr: float = 1e-3, bucket_mb: float = 25.0, **adamw):
        if adamw.get("amsgrad"):
            raise ValueError("ZeroAdamW: amsgrad is not supported (its max_exp_avg_sq is not sharded)")
        if getattr(pm, "_zero_optimizer", False):
            raise ValueError("ZeroAdamW: this ParallelModel already has one; its parameters are views of that "
                             "optimizer's buckets, so a second one would step copies")
        pm._zero_optimizer = True
        entries = pm.grad_entries()
        self.pm, self.stats = pm, pm.comm_stats
        self._reducer = GradReducer([e for e in entries if e.axes], self.stats, bucket_mb)
        self.buckets = [_Bucket(b) for b in self._reducer.buckets]
        self._launcher = None
        if pm.grad_launcher is not None:  # overlap_grad_reduce: the hooks issue these buckets' reduce-scatters
            pm.grad_launcher.remove()
            self._launcher = pm.grad_launcher = BucketLauncher(launch_list(self._reducer.buckets), self._steps)
        self.local = [e for e in entries if not e.axes]  # sharded on every axis of size > 1: no replica
        params = [b.shard for b in self.buckets] + [e.param for e in self.local]
        self.optimizer = torch.optim.AdamW(params, lr=lr, **adamw)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for _, p in self.pm.named_parameters():
            p.grad = None

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter each bucket's gradients over its replica axes (after backward on every rank; with
        overlap_grad_reduce, wait for the ones the backward issued)."""
        if self._launcher is not None:
            self._launcher.finish()
            return
        for i in range(len(self.buckets)):
            drive(self._steps(i))

    def _steps(self, i: int):
        local = CommStats()
        yield from self.buckets[i].reduce_scatter(local)
        self._reducer.account(self.buckets[i].entries, local)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for bucket in self.buckets:
            local = CommStats()
            bucket.flat.copy_(bucket.gather(bucket.shard.detach(), local))
            self._reducer.account(bucket.entries, local)

    def grad_pieces(self) -> list[GradPiece]:
        """Every gradient this rank holds after reduce_gradients(), for grad_clip.clip_grad_norm_: the bucket
        slices (disjoint over the replica group) and the unreplicated parameters' gradients."""
        grads = [b.shard.grad for b in self.buckets] + [local_tensor(e.param.grad) for e in self.local
                                                         if e.param.grad is not None]
        return [GradPiece(g) for g in grads if g is not None]

    def state_bytes(self) -> int:
        """Bytes of AdamW state this rank holds."""
        return state_bytes(self.optimizer)

    # ---- checkpoints: the per-parameter layout of a plain AdamW over pm's shards --------------------------
    def param_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: AdamW state shaped like its local shard} (a collective: the buckets' states are
        gathered over their replica axes). Before the first step the state is zeros (what load fills)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for bucket in self.buckets:
            state = init_adam_state(self.optimizer, bucket.shard)
            full = {key: bucket.unflatten(bucket.gather(state[key], None)) for key in ADAM_KEYS}
            for e in bucket.entries:
                out[e.name] = {"step": state["step"], **{key: full[key][e.name] for key in ADAM_KEYS}}
        for e in self.local:
            out[e.name] = init_adam_state(self.optimizer, e.param)
        return out

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take this rank's slice of each bucket's state from full per-parameter tensors (param_states' layout)."""
        for bucket in self.buckets:
            state = init_adam_state(self.optimizer, bucket.shard)
            for key in ADAM_KEYS:
                flat = torch.cat([states[e.name][key].reshape(-1) for e in bucket.entries])
                flat = torch.cat([flat, flat.new_zeros(bucket.flat.numel() - flat.numel())])
                state[key].copy_(flat[bucket.lo:bucket.hi])
            steps = {float(states[e.name]["step"]) for e in bucket.entries}
            if len(steps) > 1:
                raise ValueError(f"checkpoint: parameters {[e.name for e in bucket.entries]} were saved at "
                                 f"different AdamW steps {sorted(steps)}; ZeRO steps them together")
            state["step"] = states[bucket.entries[0].name]["step"].clone()
        for e in self.local:
            self.optimizer.state[e.param] = {k: laid_out_as(e.param, local_tensor(v)) if v.dim() else v
                                             for k, v in states[e.name].items()}


def init_adam_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """opt's state for `p`; before the first step, the empty AdamW state (what AdamW creates at its first step:
    zeros and step 0), so that a load has tensors to fill."""
    if p in opt.state and opt.state[p]:
        return opt.state[p]
    if not isinstance(opt, torch.optim.AdamW | torch.optim.Adam):
        raise TypeError(f"checkpoint: restoring {type(opt).__name__} state before its first step is not supported "
                        f"(Adam and AdamW are)")
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # as torch.optim's
    state = {"step": torch.tensor(0.0, dtype=scalar), "exp_avg": torch.zeros_like(p),
             "exp_avg_sq": torch.zeros_like(p)}
    if any(g.get("amsgrad") for g in opt.param_groups):
        state["max_exp_avg_sq"] = torch.zeros_like(p)
    opt.state[p] = state
    return state


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimizer's state this rank holds (AdamW: exp_avg, exp_avg_sq and the step
    counts; of a DTensor state, its local shard)."""
    return sum(local_tensor(v).numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))

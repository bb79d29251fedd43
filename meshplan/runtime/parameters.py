"""This rank's shards of the model's parameters, as DTensors with the plan's placements (ParallelModel's half
that holds them; executor.py runs the ops on them).

`_shard_parameters` cuts each parameter's local shard once (a tied weight is stored once, in its first op's
layout; the other op gets a redistributed view), in the order the forward first uses them (the gradient buckets'
order, reversed, data_parallel.GradReducer); `_param_local` is the one `to_local()` view per forward that every op
reading the parameter shares, so its gradients add up locally before the one DTensor accumulation (one
post-accumulate-grad hook call per backward, grad_overlap.py). The gathering helpers (`full_tensor`,
`full_state_dict`, `full_grads`) are collectives: call them on every rank.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..ir import graph as G
from ..ir.graph import Op
from ..ir.placement import Placement, Replicate, Shard
from ..ir.plan import PlanError
from . import sharding
from .data_parallel import GradEntry
from .device_mesh import as_dtensor, grad_placements, grad_spec, local_view
from .redistribute import redistribute


class ShardedParameters:
    """The parameter half of ParallelModel (a mixin: it reads the executor's plan, ops, modules, mesh groups and
    axes, and keeps the shards in self._params)."""

    def _shard_parameters(self, model: nn.Module) -> None:
        """Cut this rank's shard of every parameter. A parameter used by two ops (tied weights) is stored once,
        in its first op's layout; the other op gets a view redistributed to its own layout."""
        canonical = {id(p): name for name, p in model.named_parameters()}
        self._aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
        self._placement: dict[str, tuple[Placement, ...]] = {}
        self._owner: dict[str, str] = {}
        self._full_shapes: dict[str, tuple[int, ...]] = {}
        self._params: dict[str, nn.Parameter] = {}  # DTensors (plain tensors on a one-rank mesh)
        self._grad_specs: dict[str, object] = {}  # the layout of an op's gradient of each (to_local's grad_placements)
        self._locals: dict[str, torch.Tensor] = {}  # this forward's to_local() of each parameter (_param_local)
        self._uses: dict[str, dict[str, tuple[str, tuple[Placement, ...]]]] = {}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}
        self.shards = nn.ParameterDict()
        params = dict(model.named_parameters(remove_duplicate=False))
        for op in self._ops:
            if op.kind == G.INPUT and op.attrs.get("param") in params:  # read by a generic op: replicated
                self._add_shard(self._aliases[op.attrs["param"]], params[op.attrs["param"]], self._replicated(),
                                op.name)
            module = self._modules_of[op.name]
            if module is None:
                continue
            p = self.plan.ops[op.name]
            uses = {}
            for pname, param in module.named_parameters():
                cname = canonical[id(param)]
                placement = sharding.param_placement(op, p.strategy, p.axis, self.plan.mesh.axes, pname)
                uses[pname] = (cname, placement)
                self._add_shard(cname, param, placement, op.name)
            self._uses[op.name] = uses
            self._buffers[op.name] = {n: b.to(self.groups.device) for n, b in module.named_buffers()}
        for cname, param in model.named_parameters() if self._stage is None else ():  # used by no op
            self._add_shard(cname, param, self._replicated(), "")  # replicated, gradient zero

    def _add_shard(self, cname: str, param: torch.Tensor, placement: tuple[Placement, ...], op: str) -> None:
        if cname in self._params:
            return
        self._placement[cname], self._owner[cname] = placement, op
        local = param.detach()
        for g, pl in zip(self.axes, placement):
            if isinstance(pl, Shard) and g.size > 1:
                if local.shape[pl.dim] % g.size:
                    raise PlanError(f"plan.ops[{op!r}]: mesh axis {g.name}={g.size} does not divide dim {pl.dim} "
                                    f"of {cname} {tuple(param.shape)}")
                local = local.chunk(g.size, pl.dim)[g.index]
        self._full_shapes[cname] = tuple(param.shape)
        value = torch.empty(local.shape, dtype=local.dtype, device=self.groups.device) if local.is_meta \
            else local.clone().to(self.groups.device)
        if self._device_mesh is not None:
            value = as_dtensor(value, self._device_mesh, self.groups, placement, tuple(param.shape))
            self._grad_specs[cname] = grad_spec(value, grad_placements(self.groups, placement, param.dim()))
        shard = nn.Parameter(value, requires_grad=param.requires_grad)
        self._params[cname] = shard
        self.shards[cname.replace(".", "/")] = shard

    def _grad_entries(self) -> list[GradEntry]:
        out = []
        for cname, param in self._params.items():
            placement = self._placement[cname]
            axes = tuple(g for g, pl in zip(self.axes, placement) if g.size > 1 and not isinstance(pl, Shard))
            owner = self.plan.ops.get(self._owner[cname])
            prec = owner.precision.get("grad", "fp32") if owner else "fp32"
            out.append(GradEntry(cname, param, axes, prec, self._owner[cname]))
        return out

    # ---- parameters ------------------------------------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters this rank holds (DTensors; a pipeline stage's only), named like the model's."""
        for name, p in self._params.items():
            yield prefix + name, p

    @property
    def device_mesh(self) -> DeviceMesh | None:
        """torch's DeviceMesh the parameters are DTensors on (None on a one-rank mesh: plain tensors)."""
        return self._device_mesh

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The model's shape of parameter `name` (the DTensor's global shape)."""
        return self._full_shapes[self._aliases.get(name, name)]

    def placement_of(self, name: str) -> tuple[Placement, ...]:
        """How parameter `name` is laid out over the mesh (one placement per axis)."""
        return self._placement[self._aliases.get(name, name)]

    def _op_params(self, op: Op) -> dict[str, torch.Tensor]:
        out = dict(self._buffers.get(op.name, {}))
        for pname, (cname, placement) in self._uses.get(op.name, {}).items():
            t = self._param_local(cname)
            if placement != self._placement[cname]:  # a tied weight laid out differently by this op
                t = redistribute(t, self._placement[cname], placement, self.axes, op=op.name, tag="param",
                                 stats=self.comm_stats)
            out[pname] = t
        return out

    def _param_local(self, cname: str) -> torch.Tensor:
        """This rank's shard of parameter `cname`, differentiable back to the DTensor parameter (to_local with
        grad_placements, device_mesh.local_view): one per forward, shared by every op that reads it, so its
        gradients add up locally before the one DTensor accumulation."""
        t = self._locals.get(cname)
        if t is None:
            p = self._params[cname]
            t = local_view(p, self._grad_specs[cname]) if isinstance(p, DTensor) else p
            self._locals[cname] = t
        return t

    def _replicated(self) -> tuple[Placement, ...]:
        return tuple(Replicate() for _ in self.axes)

    def grad_entries(self) -> list[GradEntry]:
        """Every local shard with the axes it is replicated on (what reduce_gradients sums over; zero.py)."""
        return self._grad_entries()

    def gathered(self, t: torch.Tensor, placement) -> torch.Tensor:
        """The full tensor of a local shard `t` laid out as `placement` (a collective: call on every rank)."""
        with torch.no_grad():
            return redistribute(t.detach(), placement, self._replicated(), self.axes).clone()

    def dtensor(self, name: str, value: torch.Tensor | None = None) -> DTensor | torch.Tensor:
        """Parameter `name` detached (a DTensor on device_mesh()), or `value` laid out like it: a DTensor as is,
        a local shard (e.g. of an optimizer state) as a DTensor with the parameter's placements. A 1-rank mesh has no
        DeviceMesh: the tensor."""
        cname = self._aliases.get(name, name)
        t = (self._params[cname] if value is None else value).detach()
        if self._device_mesh is None or isinstance(t, DTensor):
            return t
        return as_dtensor(t, self._device_mesh, self.groups, self._placement[cname], self._full_shapes[cname])

    def full_tensor(self, name: str, value: torch.Tensor | None = None) -> torch.Tensor:
        """Parameter `name` (or `value`, laid out like it: its gradient, an optimizer state) in full, on the CPU,
        on every rank: DTensor.full_tensor() (a collective over the axes it is sharded or Partial on)."""
        t = self.dtensor(name, value)
        with torch.no_grad():
            full = t.full_tensor() if isinstance(t, DTensor) else t
        return full.clone().cpu()  # never an alias of a replicated shard

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on every rank, keyed like model.state_dict() (DTensor.full_tensor of each shard). A
        pipeline stage holds only its own parameters: it returns those (and the model's buffers), and the stages'
        dicts together are the model's (a collective within the stage's mesh)."""
        out = {}
        for key, value in self._model.state_dict().items():
            cname = self._aliases.get(key)
            if cname is None:
                out[key] = value.clone()
            elif cname in self._params:
                out[key] = self.full_tensor(cname)
        return out

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients on every rank, keyed like model.named_parameters() (call after reduce_gradients)."""
        out = {}
        for cname, p in self._params.items():
            out[cname] = self.full_tensor(cname, p.grad if p.grad is not None else torch.zeros_like(p))
        return out

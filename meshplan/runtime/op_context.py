"""OpContext: everything one op's parallel implementation needs for one call."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ir.graph import Op
from ..ir.placement import Placement, Replicate
from ..ir.plan import OpPlan
from .collectives import Channel
from .comm_stats import CommStats
from .process_groups import AxisGroup
from .redistribute import redistribute

_TRIVIAL = AxisGroup("-", 1, 0, (0,), None)


@dataclass
class OpContext:
    op: Op
    plan: OpPlan
    module: nn.Module | None
    params: dict[str, torch.Tensor]  # local parameters (in this op's layout) and buffers, by module-relative name
    axes: list[AxisGroup]  # every mesh axis, outermost first
    stats: CommStats | None
    batch: int  # global batch and sequence sizes of this call
    seq: int
    comm_stream: object | None = None  # on CUDA: the rank's side stream the emitted overlap code issues comms on

    @property
    def model_axis(self) -> AxisGroup:
        for g in self.axes:
            if g.name == self.plan.axis:
                return g
        return _TRIVIAL

    @property
    def n(self) -> int:
        return self.model_axis.size

    @property
    def index(self) -> int:
        return self.model_axis.index

    @property
    def attrs(self) -> dict:
        return self.op.attrs

    def model_axis_input(self) -> Placement:
        """The op's input placement on its model axis (Replicate when it has none)."""
        if self.plan.axis is None:
            return Replicate()
        return self.plan.input[[g.name for g in self.axes].index(self.plan.axis)]

    def channel(self, tag: str) -> Channel:
        return Channel(self.model_axis, self.op.name, tag, self.plan.precision.get(tag, "fp32"), self.stats)

    def redistribute(self, x: torch.Tensor, src, dst, tag: str) -> torch.Tensor:
        return redistribute(x, src, dst, self.axes, op=self.op.name, tag=tag,
                            precision=self.plan.precision.get(tag, "fp32"), stats=self.stats)

    def replicated(self) -> tuple[Placement, ...]:
        return tuple(Replicate() for _ in self.axes)

"""How long a task takes: the `Durations` seam between the scheduler and a cost model.

The scheduler only calls `durations(task) -> seconds`. `durations_for(cluster, mesh)` picks the implementation:
the planner's cost model (`PlannerDurations`) for a cluster with a configs/clusters/NAME.yaml, else this module's
roofline with explicit hardware numbers (`Roofline`, presets in ROOFLINES). Which one is used is the one branch
in `durations_for`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..ir import graph as G
from ..ir.mesh import Mesh
from ..ir.strategies import CORE
from .task_graph import BWD, Task


class Durations(Protocol):
    name: str

    def __call__(self, task: Task) -> float:
        """Seconds `task` takes on its stream, when nothing else competes for that stream."""


def wire_bytes(collective: str, nbytes: float, group: int) -> float:
    """Bytes one rank sends for a collective on a tensor of `nbytes` as its group sees it (ring algorithms).

    all-gather / reduce-scatter: each rank passes on (n-1)/n of the gathered (scattered) tensor;
    all-reduce: reduce-scatter then all-gather, 2·(n-1)/n;
    all-to-all: each rank holds nbytes/n and sends (n-1)/n of that to the others.
    With nbytes = b·s·h·dtype these give docs/reference.md's V_TP (AG + RS) and V_EP (two all-to-alls of k·b·s·h).
    """
    if group <= 1:
        return 0.0
    f = (group - 1) / group
    return {"all_gather": f, "reduce_scatter": f, "all_reduce": 2 * f, "all_to_all": f / group}[collective] * nbytes


@dataclass(frozen=True)
class Roofline:
    """time = max(flops / peak, bytes / memory bandwidth) + launch (compute);
    latency·(n-1) + wire bytes / link bandwidth (communication). A collective spanning several mesh axes runs at
    its slowest axis's bandwidth (`axis_bw`; axes not named there use `link_bw`)."""

    name: str
    peak_flops: float  # FLOP/s of one rank
    mem_bw: float  # bytes/s of one rank's memory
    link_bw: float  # bytes/s one rank sends
    latency: float = 10e-6  # seconds per step of a ring / per peer of an all-to-all
    launch: float = 5e-6  # seconds of overhead per compute kernel
    axis_bw: dict[str, float] = field(default_factory=dict)

    def __call__(self, task: Task) -> float:
        if task.stream == "compute":
            return max(task.flops / self.peak_flops, task.mem_bytes / self.mem_bw) + self.launch
        bw = min((self.axis_bw.get(a, self.link_bw) for a in task.axes), default=self.link_bw)
        return self.latency * (task.group - 1) + wire_bytes(task.collective, task.nbytes, task.group) / bw


ROOFLINES = {
    # docs/reference.md "Hardware": H800 989 TFLOPS dense BF16, 3.35 TB/s HBM, NVLink 200 GB/s per direction; inter-node
    # ~50 GB/s per
    # GPU (set axis_bw={"dp": 50e9} for a data-parallel axis across nodes). Latency and launch are typical, not
    # measured. Used only where the planner's configs/clusters/h800.yaml is not available.
    "h800": Roofline("h800", 989e12, 3.35e12, 200e9),
    # CPU ranks talking gloo over loopback, as the runtime's tests do. Uncalibrated guesses of the right order, so
    # that a tiny model's compute and collectives come out comparable; calibrate before trusting absolute times.
    "cpu-gloo": Roofline("cpu-gloo", 50e9, 10e9, 2e9, latency=50e-6, launch=10e-6),
}


@dataclass(frozen=True)
class Fixed:
    """Durations from a function of the task (tests, what-if studies): `fn(task) -> seconds`."""

    fn: Callable[[Task], float]
    name: str = "fixed"

    def __call__(self, task: Task) -> float:
        return float(self.fn(task))


class PlannerDurations:
    """The planner's cost model for one cluster (configs/clusters/NAME.yaml) and mesh.

    Collectives use the planner's own alpha-beta model (meshplan.planner.collectives_cost: two-level NVLink/NIC
    rings, concurrent all-to-all, per-collective efficiencies and calibrated alpha/beta), with the same tensor-size
    convention as `wire_bytes`. Compute uses the cluster's achievable FLOP/s and HBM bandwidth as a roofline, the
    GEMM rate scaled by the planner's size efficiency (cost_model.size_efficiency: prod x / (x + gemm_half_size)
    over the task's GEMM dims) where the phase names its GEMM: so a chunk's narrower GEMM runs less efficiently,
    the price of splitting an op into chunks. Phases without GEMM dims (attention's core, the un-permute, ops left
    whole) are priced at the achievable rate. On a cluster with a kernel model (GPU clusters) compute is the
    planner's kernel model instead (planner/kernels.py `pass_seconds`: waves of GEMM tiles, FlashAttention's own
    efficiency, memory-bound bytes, launches), so a schedule prices a task as the planner prices its op.
    """

    def __init__(self, cluster, mesh: Mesh | None = None):
        from ..planner import collectives_cost, kernels

        self.cluster, self.mesh, self._cc, self._kernels = cluster, mesh, collectives_cost, kernels
        self.name = f"planner cost model, cluster {cluster.name}"
        self._local: dict[tuple[str, ...], int] = {}

    def local(self, axes: tuple[str, ...], group: int) -> int:
        """Ranks of a group over `axes` that share a node (ranks are row-major over the mesh, a node holds
        gpus_per_node consecutive ranks): the group of rank 0 stands for all."""
        if self.mesh is None:
            return group  # no layout known: assume the group fits in a node
        if axes not in self._local:
            strides = {a: math.prod(self.mesh.shape[self.mesh.index(a) + 1:]) for a in axes}
            ranks = [sum(c * strides[a] for a, c in zip(axes, coord))
                     for coord in itertools.product(*(range(self.mesh.axis_size(a)) for a in axes))]
            self._local[axes] = sum(r < self.cluster.gpus_per_node for r in ranks)
        return self._local[axes]

    def __call__(self, task: Task) -> float:
        if task.stream == "compute" and self.cluster.kernels is not None:
            return self._kernels.pass_seconds(task.flops, task.mem_bytes, task.gemm_dims, self.cluster,
                                              task.direction == BWD, attention=task.kind == G.ATTENTION
                                              and task.phase == CORE)
        if task.stream == "compute":
            eff = math.prod(x / (x + self.cluster.gemm_half_size) for x in task.gemm_dims)
            return max(task.flops / (self.cluster.achievable_flops * eff), task.mem_bytes / self.cluster.hbm_bandwidth)
        t = self._cc.traffic(task.collective, task.nbytes, task.group, self.local(task.axes, task.group))
        return float(self._cc.comm_time(task.collective, t, self.cluster))


def _planner_cost_model(cluster: str, mesh: Mesh | None) -> Durations | None:
    """The planner's cost model for configs/clusters/`cluster`.yaml, or None where there is no such cluster file."""
    from ..inputs import find_config
    from ..planner.cluster import ClusterError, load_cluster

    try:
        find_config("clusters", cluster, "cluster", ClusterError)
    except ClusterError:  # no such file: a roofline preset, perhaps
        return None
    return PlannerDurations(load_cluster(cluster), mesh)  # a malformed file raises ClusterError naming the field


def durations_for(cluster: str = "h800", mesh: Mesh | None = None) -> Durations:
    """The cost model for `cluster` on `mesh`: the planner's (configs/clusters/NAME.yaml) when there is one, else
    the roofline preset of that name."""
    planner = _planner_cost_model(cluster, mesh)
    if planner is not None:
        return planner
    if cluster not in ROOFLINES:
        raise ValueError(f"cluster {cluster!r}: no configs/clusters/{cluster}.yaml for the planner's cost model "
                         f"and no roofline preset of that name (presets: {', '.join(ROOFLINES)})")
    return ROOFLINES[cluster]

"""The planning problem on one mesh, as plain numbers, and the step-time model that prices an assignment.

A Group is a set of identical ops (one op template: identical layers share it) with one Choice per candidate
strategy; an Edge joins two groups (count = how many op-level edges it stands for); a Stage is one pipeline
stage's share of the groups. The ILP (ilp.py) minimises exactly what `evaluate` computes, so brute force over
assignments and the ILP agree (tests/planner/test_ilp_brute_force.py).

Step-time model (all times in seconds):
  per micro-batch on stage k, for each group g with c instances there:
      compute_g = c · compute(s_g)
      comm_g    = c · sum of the op's own collectives + the reshardings on its input edges (forward + backward)
      exposed_g = c · sum of their exposed times (Choice.floors, Edge.floor)
    Overlap is a property of each collective in the schedule (planner/overlap.py): what hides is the min of the
    collective's time and the compute that really runs beside it (another chunk's phase, another micro-batch's
    layer, the GEMM a TP collective feeds), precomputed per (op, strategy, precision), so the ILP stays linear.
      T_k = sum_g (compute_g + exposed_g) + point-to-point sends to neighbouring stages
  per step: gradient reduction G_k (once per step) hides behind the last micro-batch's backward (2/3 of its
    compute) where the schedule overlaps it, except its last chunk (1/chunks_k: a layer's, or a virtual stage's);
    the distributed optimizer's parameter all-gather P_k likewise behind the first micro-batch's forward (1/3):
    X_k = max(G_k / chunks_k, G_k - 2/3 · compute_k) + max(P_k / chunks_k, P_k - 1/3 · compute_k) + optimizer
    update time (G_k, P_k whole where the schedule does not overlap them)
  step = (m + (pp - 1)/v) · max_k T_k + max_k X_k  (1F1B: bubble fraction (pp-1)/(m+pp-1); v virtual stages
    per rank (interleaved, plan_settings) divide the bubble by v)
  memory_k = sum_g c · static(s_g) + inflight_k · sum_g c · activations(s_g) <= limit  (1F1B: stage k holds
    min(pp - k, m) micro-batches)
  error: sqrt(sum over every collective instance of its squared relative error) <= error budget (independent
    roundings add in variance); fp32 adds none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Choice:
    compute: float  # s per micro-batch, forward + backward
    colls: dict[str, dict[str, float]] = field(default_factory=dict)  # own collective -> dtype -> s per micro-batch
    grad: dict[str, float] = field(default_factory=dict)  # dtype -> s per step (empty: no parameters)
    err2: dict[str, dict[str, float]] = field(default_factory=dict)  # collective (incl. grad) -> dtype -> error²
    static_mem: float = 0.0  # bytes: weights, gradients, optimizer state
    act_mem: float = 0.0  # bytes per in-flight micro-batch
    opt_time: float = 0.0  # s per step
    p2p: float = 0.0  # s per micro-batch to move this op's output between pipeline stages (one direction)
    floors: dict[str, dict[str, float]] = field(default_factory=dict)  # own collective -> dtype -> exposed s
    gather: float = 0.0  # s per step: the distributed optimizer's parameter all-gather (0 without it)
    # Own collectives whose floors hold only while every one of them is in an async precision (meshplan's runtime
    # chunks an op only if none of its collectives is compressed): otherwise all of them are exposed. The ILP
    # keeps them all async or none (ilp.add_group_collectives).
    together: tuple[str, ...] = ()
    async_dtypes: tuple[str, ...] = ("fp32",)

    def floor(self, name: str, dt: str) -> float:
        """The part of own collective `name` in `dt` that the schedule does not hide (all of it if unstated)."""
        return self.floors.get(name, self.colls[name])[dt]

    def exposed(self, name: str, dt: str, dtype_of) -> float:
        """floor(), unless `name` is one of `together` and one of them is not async (dtype_of: collective -> dt)."""
        if name in self.together and any(dtype_of(c) not in self.async_dtypes for c in self.together):
            return self.colls[name][dt]
        return self.floor(name, dt)


@dataclass
class Group:
    name: str
    choices: dict[str, Choice]
    count: int  # instances in the whole model
    dtypes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # collective -> precisions it may use
    ops: list[str] = field(default_factory=list)


@dataclass
class Edge:
    src: str
    dst: str
    coll: str  # the consumer's collective name: in0, in1, ...
    count: int
    cost: dict[tuple[str, str], dict[str, float]]  # (src choice, dst choice) -> dtype -> s per micro-batch
    err2: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("fp32",)  # precisions the resharding may use (each consumer op has one edge per
    # input, so the precision is per edge: the in{i} of exactly the consumer ops this edge feeds)
    floor: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (src, dst) -> dtype -> exposed s
    label: dict[tuple[str, str], str] = field(default_factory=dict)  # (src, dst choice) -> collective kinds


@dataclass
class Stage:
    groups: dict[str, int]  # group -> instances on this stage
    edges: dict[int, int]  # edge index -> instances on this stage (counted at the consumer)
    sends: dict[str, int] = field(default_factory=dict)  # group -> outputs crossing a stage boundary here
    inflight: int = 1
    index: int = 0  # first pipeline stage this composition stands for
    layers: int = 1  # transformer layers on the stage (the chunks a per-layer gradient reduction runs in)


@dataclass
class Problem:
    groups: dict[str, Group]
    edges: list[Edge]
    stages: list[Stage]
    microbatches: int = 1
    pp: int = 1
    mem_limit: float = math.inf
    error_budget: float | None = None  # None: unconstrained
    vp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B: plan_settings)
    grad_overlap: bool = True  # gradient reduction behind the backward (overlap.Overlap.grad_reduce)
    gather_overlap: bool = False  # parameter all-gather behind the next forward (Overlap.param_gather)
    dp_chunk: str = "layer"  # the last gradient / parameter chunk: a layer's, or a virtual stage's (Overlap)

    @property
    def bubble_slots(self) -> float:
        """Stage slots a step waits beyond its m micro-batches: pp - 1, divided by v when interleaved."""
        return (self.pp - 1) / self.vp

    def dp_chunks(self, st: "Stage") -> int:
        """Chunks stage st's gradient reduction (and parameter gather) run in: per layer, or per virtual stage."""
        return st.layers if self.dp_chunk == "layer" or self.pp == 1 else self.vp


@dataclass
class Assignment:
    strategy: dict[str, str]
    precision: dict[tuple[str, str], str] = field(default_factory=dict)  # (group, own collective | grad) -> dtype
    edge_precision: dict[int, str] = field(default_factory=dict)  # edge index -> dtype of its resharding

    def dtype(self, g: str, c: str, problem: Problem) -> str:
        return self.precision.get((g, c)) or problem.groups[g].dtypes.get(c, ("fp32",))[0]

    def edge_dtype(self, ei: int, problem: Problem) -> str:
        return self.edge_precision.get(ei) or problem.edges[ei].dtypes[0]


@dataclass
class GroupCost:
    compute: float = 0.0
    comm: float = 0.0
    exposed: float = 0.0
    floor: float = 0.0  # communication no schedule hides
    by_coll: dict[str, float] = field(default_factory=dict)  # collective (own name, or the edge's kind) -> s


@dataclass
class Breakdown:
    step: float
    stage_times: list[float]
    grad_exposed: float  # per-step tail of the slowest stage: exposed gradient sync + param gather + optimizer
    memory: list[float]
    error: float
    feasible: bool
    binding: str = ""  # why not feasible
    groups: list[dict[str, GroupCost]] = field(default_factory=list)  # per stage


def edge_time(ei: int, a: Assignment, p: Problem) -> tuple[float, float]:
    """(seconds per micro-batch, squared error) of one instance of edge ei's resharding under `a`."""
    e = p.edges[ei]
    key = (a.strategy[e.src], a.strategy[e.dst])
    if key not in e.cost:
        return 0.0, 0.0
    dt = a.edge_dtype(ei, p)
    return e.cost[key][dt], e.err2.get(key, {}).get(dt, 0.0)


def evaluate(p: Problem, a: Assignment) -> Breakdown:
    t_stage, x_stage, mems, per_stage = [], [], [], []
    for st in p.stages:
        costs = {g: GroupCost() for g in st.groups}
        for g, c in st.groups.items():
            ch = p.groups[g].choices[a.strategy[g]]
            costs[g].compute = c * ch.compute
            for name, t in ch.colls.items():
                dt = a.dtype(g, name, p)
                costs[g].comm += c * t[dt]
                costs[g].floor += c * ch.exposed(name, dt, lambda n, g=g: a.dtype(g, n, p))
                costs[g].by_coll[name] = costs[g].by_coll.get(name, 0.0) + c * t[dt]
        for ei, c in st.edges.items():
            e = p.edges[ei]
            t = c * edge_time(ei, a, p)[0]
            key = (a.strategy[e.src], a.strategy[e.dst])
            costs[e.dst].comm += t
            costs[e.dst].floor += c * e.floor[key][a.edge_dtype(ei, p)] if key in e.floor else t
            name = e.label.get(key, e.coll)
            costs[e.dst].by_coll[name] = costs[e.dst].by_coll.get(name, 0.0) + t
        for gc in costs.values():
            gc.exposed = gc.floor
        compute = sum(gc.compute for gc in costs.values())
        p2p = sum(c * p.groups[g].choices[a.strategy[g]].p2p for g, c in st.sends.items())
        t_stage.append(compute + sum(gc.exposed for gc in costs.values()) + p2p)
        static = act = 0.0
        for g, c in st.groups.items():
            ch = p.groups[g].choices[a.strategy[g]]
            static += c * ch.static_mem
            act += c * ch.act_mem
        x_stage.append(sum(stage_tail(p, a, st, compute)))
        mems.append(static + st.inflight * act)
        per_stage.append(costs)
    err2 = 0.0
    for g, grp in p.groups.items():
        ch = grp.choices[a.strategy[g]]
        for name, by_dt in ch.err2.items():
            err2 += grp.count * by_dt.get(a.dtype(g, name, p), 0.0)
    for ei, e in enumerate(p.edges):
        err2 += e.count * edge_time(ei, a, p)[1]
    step = (p.microbatches + p.bubble_slots) * max(t_stage) + max(x_stage)
    error = math.sqrt(err2)
    binding = ""
    if max(mems) > p.mem_limit * (1 + 1e-9):
        binding = f"memory: {max(mems) / 1e9:.1f} GB per GPU > {p.mem_limit / 1e9:.1f} GB"
    elif p.error_budget is not None and error > p.error_budget * (1 + 1e-9) + 1e-15:
        binding = f"error: {error:.3g} > budget {p.error_budget:.3g}"
    return Breakdown(step, t_stage, max(x_stage), mems, error, not binding, binding, per_stage)


def stage_tail(p: Problem, a: Assignment, st, compute: float) -> tuple[float, float, float]:
    """(exposed gradient sync, exposed parameter gather, optimizer) of one stage, per step: where the schedule
    overlaps them, the sync hides behind the backward (2/3 of the compute), the gather behind the forward (1/3),
    all but their last chunk."""
    k = p.dp_chunks(st)
    grad = gather = opt = 0.0
    for g, c in st.groups.items():
        ch = p.groups[g].choices[a.strategy[g]]
        if ch.grad:
            grad += c * ch.grad[a.dtype(g, "grad", p)]
            gather += c * ch.gather
        opt += c * ch.opt_time
    gx = max(grad / k, grad - 2 / 3 * compute) if p.grad_overlap else grad
    px = max(gather / k, gather - compute / 3) if p.gather_overlap else gather
    return gx, px, opt

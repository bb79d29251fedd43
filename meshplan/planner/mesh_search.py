"""The outer search: every mesh factorisation G = pp · d · n (n <= GPUs per node divides the node, pp at most the
layer count with stages as even as it allows, d divides the global batch) and micro-batch size b, each priced by
the ILP; the best wins.

Meshes are visited in order of a lower bound on their step time (each op at its cheapest strategy, communication
only (1 - overlap) exposed, no reshardings), after a memory check that is exact (memory is separable per op, so
the smallest per-op footprints are simultaneously achievable). The search stops once the next lower bound cannot
beat the best ILP optimum, so only a handful of ILPs are solved even for 1440 GPUs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from ..ir.graph import Graph
from ..ir.plan import PlanError
from ..ir.strategies import allowed_precisions, batch_parallel_error
from . import ilp
from .cluster import Cluster
from .memory import OPTIMIZER_BYTES, WEIGHT_GRAD_BYTES, static_bytes
from .pricing import CostModel, MeshConfig, Options
from .problem import Assignment, Breakdown, Problem, evaluate

# Options.recompute -> the granularities searched (MeshConfig.granularity: none, selective, full)
RECOMPUTE_CHOICES = {"auto": ("none", "selective", "full"), "never": ("none",), "always": ("full",),
                     "selective": ("selective",)}


class PlannerError(PlanError):
    """No plan fits; the message names the binding constraint and the smallest fix."""


@dataclass
class Result:
    mesh: MeshConfig
    problem: Problem
    assignment: Assignment
    breakdown: Breakdown
    cost_model: CostModel
    searched: int = 0  # meshes considered
    solved: int = 0  # ILPs solved
    seconds: float = 0.0
    log: list[tuple[MeshConfig, float, float | None]] = field(default_factory=list)  # (mesh, bound, optimum)


def divisors(x: int) -> list[int]:
    return [i for i in range(1, x + 1) if x % i == 0]


def meshes(gpus: int, global_batch: int, n_layers: int, gpus_per_node: int, max_micro_batch: int = 64,
           model_axis: list[int] | None = None, pp: list[int] | None = None,
           recompute: tuple[str, ...] = ("none", "full"), pricing_only: bool = False) -> list[MeshConfig]:
    """recompute: the granularities to try. pricing_only: also 2 or 4 virtual pipeline stages (plan_settings; meshplan's
    runtime does not run them) where the layers divide into pp·v chunks and pp the micro-batches."""
    out = []
    for n in model_axis or [x for x in divisors(gpus_per_node) if gpus % x == 0]:
        for p in pp or range(1, max(n_layers, 1) + 1):  # uneven stages allowed (layers_per_stage)
            if gpus % (n * p):
                continue
            d = gpus // (n * p)
            if global_batch % d:
                continue
            per_replica = global_batch // d
            b = 1
            while b <= min(per_replica, max_micro_batch):
                if per_replica % b == 0:
                    mc = MeshConfig(n, d, p, b, per_replica // b)
                    out += [replace(mc, recompute=rc == "full", selective=rc == "selective") for rc in recompute]
                    if pricing_only and p > 1:
                        out += _interleaved(mc, n_layers, recompute)
                b *= 2
    return out


def _interleaved(mc: MeshConfig, n_layers: int, recompute: tuple[str, ...]) -> list[MeshConfig]:
    return [replace(mc, recompute=rc == "full", selective=rc == "selective", vp=vp) for vp in (2, 4)
            if n_layers % (mc.pp * vp) == 0 and mc.m % mc.pp == 0 for rc in recompute]


class Bounds:
    """Cheap per-mesh bounds from per-(n, b) candidate values, cached."""

    def __init__(self, cm: CostModel):
        self.cm = cm
        self._vals: dict[tuple, tuple] = {}
        self._grad: dict[tuple, dict] = {}
        self._stage_terms: dict[tuple, list] = {}
        self.edge_ids = {k: i for i, k in enumerate(cm.edges)}

    def _per_group(self, mc: MeshConfig) -> tuple[dict, dict]:
        """Per group and candidate: (compute, cheapest own communication, activations, (split, replicated));
        per edge and consumer candidate: the cheapest resharding over producer candidates and precisions."""
        key = (mc.n, mc.b, mc.granularity)
        if key not in self._vals:
            vals, cands = {}, {}
            for g, gi in self.cm.groups.items():
                allv = self.cm.values(g, mc.n, mc.b)
                cands[g] = self.cm.candidates(g, mc)
                vals[g] = {}
                for c in cands[g]:
                    v = allv[gi.cands.index(c)]
                    ch = self.cm.choice(g, c, mc, v, light=True)
                    # exposed own communication (another micro-batch may hide EP's all-to-alls entirely)
                    own = 0.0 if self.cm.opt.overlap.a2a else sum(min(t.values()) for t in ch.floors.values())
                    vals[g][c] = (ch.compute, own, ch.act_mem, tuple(v[2:4]))
            emin = {}
            for ek in self.cm.edges:
                gs, gd, idx = ek
                cost, _ = self.cm.edge_costs(ek, cands[gs], cands[gd], mc, ("fp8",))
                emin[self.edge_ids[ek]] = {t: min((min(cost[s, t].values()) if (s, t) in cost else 0.0)
                                                  for s in cands[gs]) for t in cands[gd]}
            self._vals[key] = (vals, emin)
        return self._vals[key]

    def _stage_list(self, mc: MeshConfig):
        return self.cm.stages(mc.pp, mc.m, mc.vp)

    def memory(self, mc: MeshConfig) -> float:
        """The smallest achievable per-GPU memory of the worst stage (bytes): memory is separable per op."""
        vals, _ = self._per_group(mc)
        worst = 0.0
        for st in self._stage_list(mc):
            total = 0.0
            for g, c in st.groups.items():
                total += c * min(static_bytes(sp, rp, mc.n, mc.d, self.cm.opt.zero) + st.inflight * act
                                 for _, _, act, (sp, rp) in vals[g].values())
            worst = max(worst, total)
        return worst

    def _grads(self, mc: MeshConfig) -> dict:
        """Per group and candidate, the fastest gradient reduction time over its precisions (s per step)."""
        key = (mc.n, mc.d, mc.b, mc.granularity)
        if key not in self._grad:
            vals, _ = self._per_group(mc)
            self._grad[key] = {g: {c: min(self.cm.grad_time(sp, rp, mc, dt) for dt in allowed_precisions("grad"))
                                   for c, (_, _, _, (sp, rp)) in v.items()} for g, v in vals.items()}
        return self._grad[key]

    def _per_stage(self, mc: MeshConfig) -> list:
        """Per stage, per group: (instances, [(candidate, per-micro-batch bound, compute)]), cached per (n, b,
        recompute, stage composition)."""
        key = (mc.n, mc.b, mc.granularity, mc.pp, min(mc.m, mc.pp) if mc.vp == 1 else mc.m, mc.vp)
        if key not in self._stage_terms:
            vals, emin = self._per_group(mc)
            # a resharding exposes all of it, or with tp_comm_overlap at least its first of n chunks
            share = 1 / mc.n if self.cm.opt.overlap.tp else 1.0
            out = []
            for st in self._stage_list(mc):
                into = {}
                for ei, c in st.edges.items():
                    into.setdefault(self._dst[ei], []).append((ei, c))
                rows = []
                for g, c in st.groups.items():
                    rows.append((g, c, [(t, c * (comp + own) + share * sum(
                        k * emin[ei][t] for ei, k in into.get(g, ())), c * comp) for t, (comp, own, _, _) in
                        vals[g].items()]))
                out.append(rows)
            self._stage_terms[key] = out
        return self._stage_terms[key]

    def time(self, mc: MeshConfig) -> float:
        """A lower bound on the step time. For every stage k, step >= M·T_k + X_k (M = m + pp - 1), and both T_k
        and X_k's two lower bounds are sums over op groups of a function of the group's strategy, so the sum of
        per-group minima bounds it: compute, the exposed part of its own communication and of its input reshardings
        from the producer strategy that suits it best (overlap.py), fp8 everywhere; gradients bf16 as problem.py
        exposes them (none of them where the schedule overlaps them: their last chunk is not counted here)."""
        a = 0.0 if self.cm.opt.overlap.grad_reduce else 1.0
        M = mc.m + (mc.pp - 1) / mc.vp
        grads = self._grads(mc)
        best = 0.0
        for rows in self._per_stage(mc):
            b1 = b2 = 0.0
            for g, c, terms in rows:
                gr = grads[g]
                b1 += min(M * per + a * c * gr[t] for t, per, _ in terms)
                b2 += min(M * per + c * gr[t] - 2 / 3 * comp for t, per, comp in terms)
            best = max(best, b1, b2)
        return best

    @property
    def _dst(self) -> list[str]:
        if not hasattr(self, "_dst_cache"):
            self._dst_cache = [k[1] for k in self.cm.edges]
        return self._dst_cache


def search(graph: Graph, cluster: Cluster, gpus: int, global_batch: int, options: Options | None = None,
           cost_model: CostModel | None = None, model_axis: list[int] | None = None,
           pp: list[int] | None = None) -> Result:
    start = time.perf_counter()
    options = options or Options()
    cm = cost_model or CostModel(graph, cluster, options)
    limit = options.mem_limit if options.mem_limit is not None else cluster.memory_limit
    if memory_floor(graph, gpus) > limit:  # no mesh can fit: skip pricing this GPU count's meshes
        raise PlannerError(floor_message(graph, cluster, gpus, limit) + _fix(graph, cluster, gpus, global_batch,
                                                                             options, Bounds(cm), limit))
    cands = meshes(gpus, global_batch, graph.n_layers(), cluster.gpus_per_node, model_axis=model_axis, pp=pp,
                   recompute=RECOMPUTE_CHOICES[options.recompute], pricing_only=options.pricing_only)
    mixing = next((op for op in graph.ops() if batch_parallel_error(op)), None)
    if mixing is not None:  # data parallelism would not be exact: only meshes without a data-parallel axis
        cands = [mc for mc in cands if mc.d == 1]
        if not cands:
            raise PlannerError(f"{graph.name}: op {mixing.name!r} is not batch-wise ({batch_parallel_error(mixing)}), "
                               f"so no data parallelism is exact, and no mesh of {gpus} GPUs has dp=1 (mp divides "
                               f"{cluster.gpus_per_node} GPUs per node, pp <= {graph.n_layers()} layers)")
    if not cands:
        raise PlannerError(f"no mesh factorises {gpus} GPUs for {graph.name}: need G = pp x dp x mp with mp dividing "
                           f"{cluster.gpus_per_node} GPUs per node, pp <= {graph.n_layers()} layers and dp "
                           f"dividing the global batch {global_batch}")
    bounds = Bounds(cm)
    feasible, tightest = [], None
    for mc in cands:
        mem = bounds.memory(mc)
        if mc.selective and bounds.memory(replace(mc, selective=False)) <= limit:
            continue  # selective recompute where memory asks for it (the same mesh without it does not fit)
        if mem <= limit:
            feasible.append((bounds.time(mc), mc))
        elif tightest is None or mem < tightest[0]:
            tightest = (mem, mc)
    if not feasible:
        raise PlannerError(_memory_advice(graph, cluster, gpus, global_batch, options, cm, tightest, limit))
    feasible.sort(key=lambda x: (x[0], x[1].recompute, x[1].selective, x[1].vp, x[1].pp, -x[1].n))
    best: Result | None = None
    log, solved = [], 0
    for lb, mc in feasible:
        if best is not None and lb >= best.breakdown.step * (1 - 1e-9):
            break
        problem = cm.problem(mc)
        sol = ilp.solve(problem)
        solved += 1
        log.append((mc, lb, sol[1] if sol else None))
        if sol is None:
            continue
        bd = evaluate(problem, sol[0])
        if best is None or bd.step < best.breakdown.step:
            best = Result(mc, problem, sol[0], bd, cm)
    if best is None:  # only the error budget can make every memory-feasible mesh infeasible
        raise PlannerError(f"no plan meets the error budget {options.error_budget} on any mesh that fits memory: "
                           f"raise --error-budget")
    best.searched, best.solved, best.log = len(cands), solved, log
    best.seconds = time.perf_counter() - start
    return best


def memory_floor(graph: Graph, gpus: int) -> float:
    """A lower bound on any plan's per-GPU memory (bytes): every parameter's weight, gradient and optimizer state
    is held somewhere at least once, so the G GPUs hold at least total_params x (weight + grad + optimizer bytes)
    together, and the fullest GPU at least a G-th of that. No mesh can beat it, so it needs no search."""
    return graph.total_params * (WEIGHT_GRAD_BYTES + OPTIMIZER_BYTES) / gpus


def floor_message(graph, cluster: Cluster, gpus: int, limit: float) -> str:
    floor = memory_floor(graph, gpus)
    return (f"{graph.name} does not fit {gpus} x {cluster.name}: binding constraint is per-GPU memory; weights, "
            f"gradients and optimizer state alone need >= {floor / 1e9:.1f} GB per GPU even sharded over all {gpus} "
            f"GPUs > {limit / 1e9:.1f} GB usable, i.e. >= {floor / limit:.2f}x memory")


def check_memory_floor(graph, cluster: Cluster, gpus: int, options: Options) -> None:
    """Answer a model that cannot fit at once, before it is traced (graph: anything with .name and
    .total_params, e.g. from ModelConfig.param_count). The fix named is a lower bound on the GPU count."""
    limit = options.mem_limit if options.mem_limit is not None else cluster.memory_limit
    if memory_floor(graph, gpus) <= limit:
        return
    need = math.ceil(graph.total_params * (WEIGHT_GRAD_BYTES + OPTIMIZER_BYTES) / limit)
    raise PlannerError(floor_message(graph, cluster, gpus, limit) + f". Smallest fix: use >= {need} GPUs (a lower "
                       f"bound: activations need more; `meshplan plan --gpus {need}` names the mesh), or GPUs with >= "
                       f"{math.ceil(memory_floor(graph, gpus) / cluster.memory_fraction / 1e9)} GB")


def _fix(graph, cluster, gpus, global_batch, options, bounds, limit) -> str:
    """'. Smallest fix: ...' starting the search for a GPU count that fits at the floor's lower bound."""
    need = math.ceil(graph.total_params * (WEIGHT_GRAD_BYTES + OPTIMIZER_BYTES) / limit)
    gpn = cluster.gpus_per_node
    start = max(gpus, (need // gpn) * gpn if need >= gpn else need)
    fix, g = _smallest_fit(graph, cluster, start - 1, global_batch, options, bounds, limit)
    if fix is None:
        return f". Even {g} GPUs do not fit: reduce the global batch {global_batch} or use GPUs with more memory"
    return f". Smallest fix: use >= {fix.gpus} GPUs with pp >= {fix.pp} (e.g. {fix})"


def _smallest_fit(graph, cluster, g, global_batch, options, bounds, limit):
    """(the fastest-bound mesh with the least pp at the smallest GPU count above g that fits, that count)."""
    for _ in range(64):  # the smallest larger GPU count (whole nodes) with a mesh that fits
        g = (g // cluster.gpus_per_node + 1) * cluster.gpus_per_node if g >= cluster.gpus_per_node else g * 2
        fits = [m for m in meshes(g, global_batch, graph.n_layers(), cluster.gpus_per_node,
                                  recompute=RECOMPUTE_CHOICES[options.recompute]) if bounds.memory(m) <= limit]
        if fits:
            return min(fits, key=lambda m: (m.pp, bounds.time(m))), g
    return None, g


def _memory_advice(graph, cluster, gpus, global_batch, options, cm, tightest, limit) -> str:
    mem, mc = tightest
    ratio = mem / limit
    fix, g = _smallest_fit(graph, cluster, gpus, global_batch, options, Bounds(cm), limit)
    msg = (f"{graph.name} does not fit {gpus} x {cluster.name}: binding constraint is per-GPU memory; the best mesh "
           f"({mc}) needs {mem / 1e9:.1f} GB > {limit / 1e9:.1f} GB usable, i.e. >= {ratio:.2f}x memory")
    if fix is not None:
        msg += f". Smallest fix: use >= {fix.gpus} GPUs with pp >= {fix.pp} (e.g. {fix})"
    else:
        msg += f". Even {g} GPUs do not fit: reduce the global batch {global_batch} or use GPUs with more memory"
    return msg + f", or a GPU with >= {math.ceil(mem / cluster.memory_fraction / 1e9)} GB"

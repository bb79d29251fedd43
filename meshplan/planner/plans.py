"""Assignments <-> Plans: write the ILP's choice as a meshplan Plan, and price any Plan by the same model.

A planned Plan has mesh (dp=d, mp=n); every op's model axis is mp, except ops the planner makes data parallel on
mp too (the `dp` candidate), which get strategy `replicate` with axis null: batch-sharded on every axis. Pipeline
stages are the outermost axis pp (ops are never sharded over it): plan.pipeline holds the stage count, layers
per stage and micro-batches per step, which the runtime executes; plan.meta["pipeline"] also records the
micro-batch size; each stage runs the (dp, mp) mesh.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from ..ir.pipeline import Pipeline
from ..ir.plan import OpPlan, Plan, PlanError
from ..ir.strategies import collective_names
from . import cost_model as cm
from .cluster import Cluster
from .memory import DP
from .plan_settings import meta_settings, write_meta
from .pricing import CostModel, MeshConfig, Options, layers_per_stage
from .problem import Assignment, Breakdown, Problem, evaluate

MODEL_AXIS, DATA_AXIS = "mp", "dp"


def model_flops(graph: Graph, global_batch: int, seq: int) -> float:
    """Training FLOPs of one step (3x forward), the numerator of MFU (no recomputation counted)."""
    return 3.0 * float(graph.evaluate(graph.total_flops, global_batch, seq))


def _own_precisions(problem: Problem, a: Assignment, group: str) -> dict[str, str]:
    """Precision of each own collective and the gradient reduction that moves data under this assignment."""
    ch = problem.groups[group].choices[a.strategy[group]]
    live = [c for c, t in ch.colls.items() if max(t.values()) > 0]
    if ch.grad and max(ch.grad.values()) > 0:
        live.append("grad")
    return {c: a.dtype(group, c, problem) for c in live}


def to_plan(cmodel: CostModel, mc: MeshConfig, problem: Problem, a: Assignment, bd: Breakdown,
            global_batch: int, meta: dict | None = None) -> Plan:
    ops = {}
    edge_ids = {key: i for i, key in enumerate(cmodel.edges)}
    own = {g: _own_precisions(problem, a, g) for g in cmodel.groups}
    for op in cmodel.ops:  # graph order
        g = cmodel.group_of[op.name]
        cand = a.strategy[g]
        strategy, axis = ("replicate", None) if cand == DP else (cand, MODEL_AXIS)
        i, o = cm.placements(op, cand)
        prec = {c: dt for c, dt in own[g].items() if c in collective_names(op, strategy)}
        for idx, src in enumerate(op.inputs):  # each input's resharding, if it communicates
            ei = edge_ids.get((cmodel.group_of.get(src), g, idx))
            if ei is not None and mc.n > 1 and (a.strategy[problem.edges[ei].src], cand) in problem.edges[ei].cost:
                prec[f"in{idx}"] = a.edge_dtype(ei, problem)
        ops[op.name] = OpPlan(strategy, axis, (cm.BATCH, i), (cm.BATCH, o), dict(sorted(prec.items())))
    plan = Plan(cmodel.graph.name, mc.mesh, ops)
    if mc.pp > 1:  # the outermost mesh axis, with the stages the planner priced (the runtime runs them)
        plan.pipeline = Pipeline(mc.pp, tuple(layers_per_stage(cmodel.graph.n_layers(), mc.pp)), mc.m)
    plan.meta = write_meta({
        "pipeline": {"stages": mc.pp, "layers_per_stage": layers_per_stage(cmodel.graph.n_layers(), mc.pp),
                     "micro_batch_size": mc.b, "microbatches": mc.m},
        "planner": summary(cmodel, mc, bd, global_batch),
    }, mc)
    if meta:
        plan.meta["planner"].update(meta)
    return plan


def summary(cmodel: CostModel, mc: MeshConfig, bd: Breakdown, global_batch: int) -> dict:
    seq, cl = cmodel.opt.seq, cmodel.cluster
    tokens = global_batch * seq
    return {"cluster": cl.name, "gpus": mc.gpus, "global_batch": global_batch, "seq": seq,
            "step_time_s": round(bd.step, 6), "tokens_per_s": round(tokens / bd.step, 1),
            "mfu": round(model_flops(cmodel.graph, global_batch, seq) / (mc.gpus * cl.peak_flops * bd.step), 4),
            "memory_gb": round(max(bd.memory) / 1e9, 3), "bubble": round(bubble(mc), 4),
            "error": round(bd.error, 6), "error_budget": cmodel.opt.error_budget}


def bubble(mc: MeshConfig) -> float:
    """The pipeline bubble's share of the step: (pp - 1)/v idle slots out of m + (pp - 1)/v."""
    idle = (mc.pp - 1) / mc.vp
    return idle / (mc.m + idle)


@dataclass
class Priced:
    plan: Plan
    mesh: MeshConfig
    problem: Problem
    assignment: Assignment
    breakdown: Breakdown
    cost_model: CostModel


def mesh_config(plan: Plan, global_batch: int) -> MeshConfig:
    """n, d, pp, b, m of a plan: the model axis is the one axis its ops split over; the others are data axes."""
    axes = {p.axis for p in plan.ops.values() if p.axis is not None}
    if len(axes) > 1:
        raise PlanError(f"plan.ops: pricing supports one model axis, this plan uses {sorted(axes)}")
    axis = axes.pop() if axes else None
    n = plan.mesh.axis_size(axis) if axis else 1
    d = plan.mesh.size // n
    pipe = plan.meta.get("pipeline") or {}
    pp = plan.pipeline.stages if plan.pipeline.enabled else int(pipe.get("stages", 1))
    b = int(pipe.get("micro_batch_size", 1))
    recompute = plan.meta.get("activation_recompute", "none") == "full"
    if global_batch % (d * b):
        raise PlanError(f"plan.meta.pipeline.micro_batch_size: dp={d} x micro-batch {b} does not divide the global "
                        f"batch {global_batch}")
    return MeshConfig(n, d, pp, b, global_batch // (d * b), recompute, **meta_settings(plan.meta))


def price_plan(graph: Graph, cluster: Cluster, plan: Plan, global_batch: int,
               options: Options | None = None) -> Priced:
    """Price a plan exactly as the planner prices its own: same groups, same step-time model."""
    options = options or Options()
    mc = mesh_config(plan, global_batch)
    plan.validate(graph, batch=mc.b * mc.d, seq=options.seq, pricing=True)
    # report the error, don't constrain it; the overlap flags a plan's meta states (its system's: overlap.py)
    # override the options'
    priced_opts = Options(**{**options.__dict__, "error_budget": None,
                             "overlap": options.overlap.with_meta(plan.meta)})
    cmodel = CostModel(graph, cluster, priced_opts, plan=plan)
    problem = cmodel.problem(mc)
    a = Assignment({g: next(iter(grp.choices)) for g, grp in problem.groups.items()})  # dtypes: the plan's
    return Priced(plan, mc, problem, a, evaluate(problem, a), cmodel)


def fits(priced: Priced) -> bool:
    return max(priced.breakdown.memory) <= priced.problem.mem_limit * (1 + 1e-9)

"""Baseline plans, expressed as ordinary Plans and priced by the planner's own model (plans.price_plan), each as
its users run it (docs/reference.md#baselines).

megatron: Megatron-LM with sequence parallelism (docs/reference.md, "Hardware" and "Baselines"): TP over the node (mp =
8) for attention,
    the experts and dense FFNs; norms and residual adds sequence-sharded; vocab-parallel embedding; PP across
    nodes; DP outermost. Activation collectives in BF16; gradients reduce-scattered in FP32 and BF16 parameters
    all-gathered (its distributed optimizer without --grad-reduce-in-bf16: Options.zero); TP all-gathers and
    reduce-scatters exposed (no --tp-comm-overlap), the reduce-scatter and all-gather overlapped with backward /
    forward but for one layer's chunk (overlap.MEGATRON, written to plan.meta in Megatron's flag names).
megascale: MegaScale-MoE's fixed plan: Ulysses SP attention and EP experts over the node, PP=15, BF16 gradient
    exchange, run on meshplan's schedule (overlap.MESHPLAN) so that the planner's free choice is compared like for
    like (the issue's intent); MegaScale-MoE's own system overlaps more (overlap.MEGASCALE: compressed all-to-alls
    chunked too, TP and the parameter gather overlapped), which `megascale_plan(..., own_system=True)` prices.
ep_dp: all-EP/DP: the MoE FFN expert-parallel over the node, every other op data parallel on every axis (one
    sequence per GPU per micro-batch), so the only model-axis communication is the EP all-to-all and the
    batch <-> sequence all-to-all around it; run by meshplan (overlap.MESHPLAN).
Both pick the pipeline depth that fits memory fastest unless `pp` is given (docs/reference.md, "Hardware", quotes
PP=15).
"""
from __future__ import annotations

from ..ir import graph as G
from ..ir.graph import Graph
from ..ir.plan import OpPlan, Plan, PlanError
from ..ir.strategies import STRATEGIES, collective_names, divisibility_error, native_io, offered_error
from . import cost_model as cm
from .cluster import Cluster
from .mesh_search import RECOMPUTE_CHOICES, PlannerError, divisors
from .overlap import MEGASCALE, MEGATRON
from .plan_settings import write_meta
from .plans import MODEL_AXIS, Priced, fits, price_plan
from .pricing import MeshConfig, Options, layers_per_stage

MEGATRON_TP = {G.ATTENTION: "tp", G.MOE: "tp", G.FFN: "tp", G.EMBEDDING: "vocab", G.NORM: "seq", G.LINEAR: "tp",
            G.LM_HEAD: "seq", G.GENERIC: "seq"}
MEGASCALE_SP = {G.ATTENTION: "sp", G.MOE: "ep", G.FFN: "tp", G.EMBEDDING: "seq", G.NORM: "seq", G.LINEAR: "tp",
             G.LM_HEAD: "seq", G.GENERIC: "seq"}
BF16 = "bf16"
LADDER = ("none", "selective", "full")  # recompute granularities, least recomputation first


def _op_plan(op, strategy: str | None, n: int) -> OpPlan:
    """strategy None: data parallel on the model axis too (axis null, batch-sharded everywhere)."""
    if strategy is not None and (divisibility_error(op, strategy, MODEL_AXIS, n) or offered_error(op, strategy)):
        strategy = "seq" if "seq" in STRATEGIES[op.kind] and not offered_error(op, "seq") else "replicate"
    if strategy is None:
        prec = {c: BF16 for c in collective_names(op, "replicate")}
        return OpPlan("replicate", None, (cm.BATCH, cm.BATCH), (cm.BATCH, cm.BATCH), prec)
    i, o = native_io(op, strategy)
    prec = {c: BF16 for c in collective_names(op, strategy)}
    return OpPlan(strategy, MODEL_AXIS, (cm.BATCH, i), (cm.BATCH, o), prec)


def _plan(graph: Graph, mc: MeshConfig, pick, name: str) -> Plan:
    ops = {op.name: _op_plan(op, pick(op), mc.n) for op in graph.ops() if op.kind not in (G.INPUT, G.OUTPUT)}
    meta = {"baseline": name, "pipeline": {"stages": mc.pp, "layers_per_stage": layers_per_stage(graph.n_layers(),
            mc.pp), "micro_batch_size": mc.b, "microbatches": mc.m}}
    return Plan(graph.name, mc.mesh, ops, write_meta(meta, mc))


def megatron_plan(graph: Graph, mc: MeshConfig, tp_comm_overlap: bool = False) -> Plan:
    plan = _plan(graph, mc, lambda op: MEGATRON_TP[op.kind], "megatron")
    for p in plan.ops.values():  # FP32 gradient reduction unless --grad-reduce-in-bf16
        if "grad" in p.precision:
            p.precision["grad"] = "fp32"
    plan.meta.update(MEGATRON.to_meta(), tp_comm_overlap=tp_comm_overlap)
    return plan


def megascale_plan(graph: Graph, mc: MeshConfig, own_system: bool = False) -> Plan:
    plan = _plan(graph, mc, lambda op: MEGASCALE_SP[op.kind], "megascale")
    if own_system:
        plan.meta.update(MEGASCALE.to_meta())
    return plan


def ep_dp_plan(graph: Graph, mc: MeshConfig) -> Plan:
    return _plan(graph, mc, lambda op: "ep" if op.kind == G.MOE else None, "ep_dp")


def folded_plan(graph: Graph, mc: MeshConfig) -> Plan:
    """Megatron-Core's MoE parallel folding (plan_settings; needs mc.fold): the MoE expert-parallel over the whole
    model axis, every other op Megatron's TP + SP on an mc.fold-wide sub-axis (data parallel when mc.fold is 1);
    activation collectives BF16, gradients reduced in FP32 (Megatron's default)."""
    plan = _plan(graph, mc, lambda op: "ep" if op.kind == G.MOE else None if mc.fold == 1 else MEGATRON_TP[op.kind],
                 "folded")
    for p in plan.ops.values():
        if "grad" in p.precision:
            p.precision["grad"] = "fp32"
    plan.meta.update(MEGATRON.to_meta())
    return plan


BUILDERS = {"megatron": megatron_plan, "megascale": megascale_plan, "ep_dp": ep_dp_plan, "folded": folded_plan}


def baseline(kind: str, graph: Graph, cluster: Cluster, gpus: int, global_batch: int,
             options: Options | None = None, pp: int | None = None, recompute: str | None = None,
             vp: int = 1) -> Priced:
    """The baseline's plan on `gpus` GPUs, priced: the fastest pipeline depth (or the given `pp`) and activation
    recomputation setting that fits memory; with `pp` given and nothing fitting, the smallest-memory variant.
    `recompute`: the run's granularity (none | selective | full), chosen once by its user, raised along
    none -> selective -> full only where memory forces it (Megatron-Bridge's guidance: selective before full);
    None: whichever fits fastest at this scale (options.recompute). `vp`: virtual pipeline stages per rank
    (interleaved 1F1B, priced only: plan_settings), on depths whose layers divide into pp·vp chunks and whose
    micro-batches pp divides (Megatron's interleaving condition)."""
    options = options or Options()
    n = min(cluster.gpus_per_node, gpus)
    while n > 1 and gpus % n:
        n //= 2
    b = n if kind == "ep_dp" else 1  # ep_dp shards the batch over the model axis: one sequence per GPU
    depths = [pp] if pp else divisors(max(graph.n_layers(), 1))
    recompute_fixed = recompute is not None
    recompute = LADDER[LADDER.index(recompute):] if recompute is not None else RECOMPUTE_CHOICES[options.recompute]
    best = smallest = None
    for p in depths:
        if gpus % (n * p) or global_batch % (gpus // (n * p) * b):
            continue
        d = gpus // (n * p)
        m = global_batch // (d * b)
        if vp > 1 and (p == 1 or graph.n_layers() % (p * vp) or m % p):
            continue
        for rc in recompute:
            mc = MeshConfig(n, d, p, b, m, rc == "full", rc == "selective", vp)
            try:
                priced = price_plan(graph, cluster, BUILDERS[kind](graph, mc), global_batch, options)
            except PlanError:
                continue
            if smallest is None or max(priced.breakdown.memory) < max(smallest.breakdown.memory):
                smallest = priced
            if fits(priced) and (best is None or priced.breakdown.step < best.breakdown.step):
                best = priced
            if recompute_fixed and fits(priced):
                break  # the user's setting fits: no more recomputation is forced on
    if best is None and pp and smallest is not None:
        return smallest  # the caller asked for this depth: report it, marked as not fitting
    if best is None:
        why = (f"the smallest needs {max(smallest.breakdown.memory) / 1e9:.1f} GB/GPU ({smallest.mesh}) > "
               f"{smallest.problem.mem_limit / 1e9:.1f} GB" if smallest else
               "no pipeline depth divides the GPUs, layers and global batch")
        raise PlannerError(f"{kind} baseline does not fit {gpus} x {cluster.name} at mp={n}: {why}")
    return best

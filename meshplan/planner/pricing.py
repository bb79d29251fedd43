"""Prices a traced graph on a mesh: groups identical ops, evaluates every candidate's symbolic cost (lambdified
once per group), assigns ops to pipeline stages, and returns the numeric Problem the ILP and evaluate() share.

The mesh is (pp, dp, mp), mp innermost: the model axis's n ranks are consecutive (one node when n <= GPUs per
node), data-parallel peers are n apart, pipeline stages n·d apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..ir import graph as G
from ..ir.graph import Graph, Op
from ..ir.placement import Shard
from ..ir.strategies import PRECISIONS, STRATEGIES, allowed_precisions, collective_names
from . import collectives_cost as cc
from . import cost_model as cm
from . import grad_sync, memory, plan_settings
from . import overlap as ov
from .cluster import Cluster
from .memory import DP, N
from .options import DEFAULT_ERROR_BUDGET, MeshConfig, Options  # noqa: F401  (re-exported from here)
from .problem import Choice, Edge, Group, Problem, Stage

RECOMPUTE = (4 / 3, 3 / 2)
COLL_VALS = 8  # numbers per own collective in values(): X, rows, and (FLOPs, elements) before / after / whole
TP_KINDS = ov.TP_KINDS


# Per collective kind over n ranks: elements one rank encodes plus decodes, as a multiple of the tensor X of
# collectives_cost.traffic. all_to_all: its own X/n out, X/n in; all_gather: its X/n shard out, all of X in;
# reduce_scatter: all of X out (as encoded summands), (n-1)/n of X in (then a float32 local sum); all_reduce: both;
# p2p: X out, X in.
CODEC_SHARE = {"all_to_all": lambda n: 2 / n, "all_gather": lambda n: 1 + 1 / n,
               "reduce_scatter": lambda n: 2 - 1 / n, "all_reduce": lambda n: 3.0, "p2p": lambda n: 2.0}


def group_key(op: Op, spec=None) -> tuple:
    shapes = tuple((m.shape, m.dtype) for m in op.input_metas), (op.output.shape, op.output.dtype)
    return (op.template, op.kind, repr(sorted(op.attrs.items())), op.params, shapes, spec)


def plan_spec(op_plan) -> tuple:
    cand = DP if op_plan.axis is None else op_plan.strategy
    return cand, tuple(sorted(op_plan.precision.items()))


def layers_per_stage(n_layers: int, pp: int) -> list[int]:
    base, extra = divmod(n_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def stage_of_ops(ops: list[Op], pp: int, layer_of: dict[str, int | None] | None = None) -> dict[str, int]:
    """Contiguous layers per stage; ops before the first layer go to stage 0, the rest after it to the last."""
    layer_of = layer_of or {op.name: op.layer for op in ops}
    layers = sorted({layer_of[op.name] for op in ops if layer_of[op.name] is not None})
    bounds, acc = {}, 0
    for k, c in enumerate(layers_per_stage(len(layers), pp)):
        for layer in layers[acc:acc + c]:
            bounds[layer] = k
        acc += c
    out, seen_layer = {}, False
    for op in ops:
        if layer_of[op.name] is not None:
            seen_layer = True
            out[op.name] = bounds[layer_of[op.name]]
        else:
            out[op.name] = pp - 1 if seen_layer and pp > 1 else 0
    return out


@dataclass
class GroupInfo:
    name: str
    ops: list[Op]
    cands: list[str]  # candidates considered (before per-mesh divisibility filtering)
    fn: object = None  # lambdified (B, S, n) -> per-candidate values
    terms: dict[str, cm.OpTerms] = field(default_factory=dict)


class CostModel:
    """A graph and cluster, priced on any mesh. Restrict to a plan (plan=...) to price exactly that plan."""

    def __init__(self, graph: Graph, cluster: Cluster, options: Options | None = None, plan=None):
        self.graph, self.cluster, self.opt, self.plan = graph, cluster, options or Options(), plan
        if self.opt.gemm_dtype not in ("bf16", "fp8"):
            raise ValueError(f"options.gemm_dtype: {self.opt.gemm_dtype!r}; expected bf16 or fp8")
        if self.opt.ep_dispatch not in ("all_to_all", "deepep"):
            raise ValueError(f"options.ep_dispatch: {self.opt.ep_dispatch!r}; expected all_to_all or deepep")
        if self.opt.gemm_dtype == "fp8" and cluster.kernels is None:
            raise ValueError(f"options.gemm_dtype: fp8 needs a cluster with a kernels: section "
                             f"({cluster.name} has none)")
        self.ops = [op for op in graph.ops() if op.kind not in (G.INPUT, G.OUTPUT)]
        self.groups: dict[str, GroupInfo] = {}
        self.group_of: dict[str, str] = {}
        keys: dict[tuple, str] = {}
        for op in self.ops:
            spec = plan_spec(plan.ops[op.name]) if plan is not None else None
            key = group_key(op, spec)
            if key not in keys:
                # Op.template can span kinds (deepseekmoe: layer 0's dense FFN and the MoE layers share
                # "layers.*.feed_forward"), so a group is a template *and* identical hyperparameters.
                name = op.template
                if name in self.groups:
                    name = f"{op.template}[{op.kind}]"
                    while name in self.groups:
                        name = f"{name}'"
                keys[key] = name
                cands = [spec[0]] if spec else list(STRATEGIES[op.kind]) + ([DP] if self.opt.dp_ops else [])
                self.groups[name] = GroupInfo(name, [], cands)
            self.groups[keys[key]].ops.append(op)
            self.group_of[op.name] = keys[key]
        for gi in self.groups.values():
            rep = gi.ops[0]
            gi.terms = {c: cm.terms(rep, c, self.opt.balanced_routing) for c in gi.cands}
            # Small expressions lambdify fast; compute time is assembled numerically (cost_model.compute_time).
            exprs = []
            for c in gi.cands:
                t = gi.terms[c]
                exprs.append([t.flops, t.hbm_bytes, t.activations, t.params_split, t.params_replicated, t.checkpoint]
                             + [x for coll in t.colls for x in (coll.elems, coll.rows, *coll.before, *coll.after,
                                                                 *coll.whole)] + list(t.gemm_dims)
                             + list(t.kernel))
            exprs.append([rep.output.numel, rep.output.shape[-1]])
            gi.fn = sympy.lambdify((G.B, G.S, N), exprs, modules="math", docstring_limit=0)
        # op-level edges between planned ops, grouped by (producer group, consumer group, argument index)
        self.edges: dict[tuple[str, str, int], list[tuple[Op, Op]]] = {}
        names = {op.name for op in self.ops}
        for op in self.ops:
            for idx, src in enumerate(op.inputs):
                if src in names:
                    key = (self.group_of[src], self.group_of[op.name], idx)
                    self.edges.setdefault(key, []).append((graph.op(src), op))
        self._layer = {op.name: op.layer for op in self.ops}
        firsts: dict = {}  # each layer's first op, whose input is the layer's (Megatron's full recompute keeps it)
        for op in self.ops:
            if op.layer is not None:
                firsts.setdefault(op.layer, op.name)
        self._layer_inputs = set(firsts.values())
        self._consumers = {op.name: graph.consumers(op.name) for op in self.ops}
        self._stages: dict[tuple[int, int], list[Stage]] = {}
        self._compositions: dict[int, list[Stage]] = {}
        self._links: dict[str, tuple] = {}
        self._vals: dict[tuple[str, int, int], list] = {}
        self._split: dict[tuple[str, int, int, str], dict] = {}
        self._selective: dict[tuple, tuple[float, float, float]] = {}

    def values(self, g: str, n: int, b: int) -> list:
        """Per candidate of group g (in gi.cands order): [compute s/mb, activations, split params, replicated
        params, checkpoint bytes, (X, rows, before, after, whole work: Coll) per own collective]; last entry:
        [output numel, its last dim]."""
        key = (g, n, b)
        if key not in self._vals:
            gi = self.groups[g]
            raw = gi.fn(b, self.opt.seq, n)
            out = []
            for c, r in zip(gi.cands, raw):
                k = 6 + COLL_VALS * len(gi.terms[c].colls)
                nd = len(gi.terms[c].gemm_dims)
                split = cm.compute_split(r[0], r[1], r[k:k + nd], self.cluster, r[k + nd:],
                                         self.opt.gemm_dtype == "fp8")
                self._split[key + (c,)] = split
                out.append([sum(split.values())] + r[2:k])
            self._vals[key] = out + [raw[-1]]
        return self._vals[key]

    def compute_split(self, g: str, cand: str, n: int, b: int) -> dict:
        """Seconds per micro-batch of one op of group g by kind (gemm, attention, memory, launch), no recompute."""
        self.values(g, n, b)
        return self._split[(g, n, b, cand)]

    # ---- numbers for one mesh ----------------------------------------------------------------------------
    def locality(self, mc: MeshConfig) -> dict[str, int]:
        gpn = self.cluster.gpus_per_node
        return {"mp": min(mc.n, gpn), "dp": 1 if mc.n >= gpn else min(mc.d, gpn // mc.n),
                "all": min(mc.n * mc.d, gpn), "pp_inter": mc.n * mc.d >= gpn}

    def _time(self, kind: str, nbytes, n: int, local: int) -> float:
        if kind not in self._links:
            self._links[kind] = cc.link_params(self.cluster, kind)
        return cc.comm_time(kind, cc.traffic(kind, nbytes, n, local), self.cluster, links=self._links[kind])

    def _coll_time(self, op, coll, nbytes, mc: MeshConfig, local: int) -> float:
        """One op-internal collective. A routed exchange (EP's dispatch/combine: PhaseSpec.routed) moves the most
        loaded rank's rows (the mean bytes x cost_model.imbalance_factor, unless routing is force-balanced);
        across nodes with Options.ep_dispatch "deepep" it crosses the NIC once per destination node
        (collectives_cost.dedup_dispatch_traffic)."""
        n = mc.n
        if coll.routed and not self.opt.balanced_routing:
            nbytes = nbytes * cm.imbalance_factor(op.attrs["top_k"], mc.b * self.opt.seq, n)
        if self.opt.ep_dispatch == "deepep" and coll.routed and n > local:
            a = op.attrs
            t = cc.dedup_dispatch_traffic(nbytes, n, local, a["n_experts"], a["top_k"])
            if coll.kind not in self._links:
                self._links[coll.kind] = cc.link_params(self.cluster, coll.kind)
            return cc.comm_time(coll.kind, t, self.cluster, links=self._links[coll.kind])
        return self._time(coll.kind, nbytes, n, local)

    def codec_time(self, kind: str, elems, rows, dtype: str, n: int) -> float:
        """Seconds one GPU spends converting to the wire format `dtype` before collective `kind` over n ranks and
        back after it, for a tensor of `elems` activations in `rows` token rows (collectives_cost.traffic's
        convention for X): memory traffic (read activations + write codes to encode, the reverse to decode) at the
        cluster's codec efficiency of HBM bandwidth. Zero in the activations' own dtype."""
        native = self.opt.activation_dtype or self.cluster.activation_dtype
        if dtype == native or n <= 1 or kind not in CODEC_SHARE:
            return 0.0
        traffic = CODEC_SHARE[kind](n) * (elems * cc.PRECISION_BYTES[native] + cc.wire_bytes(elems, rows, dtype))
        return traffic / (self.cluster.hbm_bandwidth * self.cluster.codec(dtype))

    def grad_time(self, split, rep, mc: MeshConfig, dtype: str = "bf16") -> float:
        """Reduction of the split parameters' gradients over d ranks and the replicated ones' over n·d, once per
        step (grad_sync.py): meshplan's runtime all-reduces (fp32) or all-to-alls + all-gathers (compressed);
        with ZeRO-1 (the distributed optimizer), only the reduce-scatter part (the all-gather is gather_time's)."""
        loc = self.locality(mc)
        return (grad_sync.reduce_time(self, split, mc.d, loc["dp"], dtype)
                + grad_sync.reduce_time(self, rep, mc.n * mc.d, loc["all"], dtype))

    def gather_time(self, split, rep, mc: MeshConfig) -> float:
        """The distributed optimizer's all-gather of the updated BF16 parameters, once per step (0 without it)."""
        if not self.opt.zero:
            return 0.0
        loc = self.locality(mc)
        return (grad_sync.param_gather_time(self, split, mc.d, loc["dp"])
                + grad_sync.param_gather_time(self, rep, mc.n * mc.d, loc["all"]))

    def choice(self, g: str, cand: str, mc: MeshConfig, vals=None, light: bool = False) -> Choice:
        """One candidate priced on a mesh (light: compute, own collectives and activations only)."""
        gi, cl, loc = self.groups[g], self.cluster, self.locality(mc)
        vals = vals if vals is not None else self.values(g, mc.n, mc.b)[gi.cands.index(cand)]
        compute, act, split, rep, ckpt = vals[:5]
        # full recomputation: one more forward (4/3 of the compute), forward collectives run again (3/2)
        redo = RECOMPUTE if mc.recompute else (1.0, 1.0)
        slow = cl.local_slowdown(min(mc.n * mc.d * mc.pp, cl.gpus_per_node))  # CPU ranks sharing cores; GPUs: 1
        if mc.selective and not mc.recompute:  # plan_settings: drop norm outputs and SwiGLU outputs, rerun them
            compute, act = self.selective(g, cand, mc, compute, act)
        if mc.megatron and not mc.recompute:  # plan_settings: what Megatron-Core's experts do not keep
            moe_act = mc.selective and "moe_act" in mc.modules
            act -= plan_settings.megatron_experts(gi.ops[0], cand, mc.n, mc.b, self.opt.seq,
                                                  self.opt.gemm_dtype == "fp8", moe_act)
        keep = self.recompute_keeps(g, ckpt, act, mc) if mc.recompute else act
        ch = Choice(compute=compute * redo[0] * slow, act_mem=keep)
        for j, coll in enumerate(gi.terms[cand].colls):
            elems, rows, *work = vals[5 + COLL_VALS * j: 5 + COLL_VALS * (j + 1)]
            ch.colls[coll.name] = {dt: 2 * redo[1] * (self._coll_time(gi.ops[0], coll, cc.wire_bytes(elems, rows, dt),
                                                                      mc, loc["mp"])
                                                       + self.codec_time(coll.kind, elems, rows, dt, mc.n))
                                   for dt in PRECISIONS}
            ch.err2[coll.name] = {dt: 2 * cc.relative_error(coll.kind, dt, mc.n) ** 2 for dt in PRECISIONS}
            ch.floors[coll.name] = ov.collective_floors(self, gi.ops[0].kind, cand, coll, ch.colls[coll.name], work,
                                                   ch.compute, mc.n)
        ov.mark_together(ch, gi.ops[0].kind, cand, self.opt.overlap)
        if light:
            return ch
        if split or rep:
            ch.grad = {dt: self.grad_time(split, rep, mc, dt) for dt in allowed_precisions("grad")}
            ch.gather = self.gather_time(split, rep, mc)
            group = mc.d if not rep else mc.n * mc.d
            ch.err2["grad"] = {dt: cc.grad_relative_error(dt, group) ** 2 for dt in ch.grad}
        ch.static_mem = memory.static_bytes(split, rep, mc.n, mc.d, self.opt.zero)
        shard = split / mc.d + rep / (mc.n * mc.d) if self.opt.zero else split + rep
        ch.opt_time = 32 * shard / cl.hbm_bandwidth * slow  # Adam: read master, m, v, grad; write master, m, v, weight
        out_elems = self.values(g, mc.n, mc.b)[-1][0]
        sharded = isinstance(cm.placements(gi.ops[0], cand)[1], Shard)
        ch.p2p = mc.vp * self._time("p2p", memory.ACT_BYTES * out_elems / (mc.n if sharded else 1), 2,
                                    1 if loc["pp_inter"] else 2)  # interleaved: v times the stage boundaries
        return ch

    def recompute_keeps(self, g: str, ckpt: float, act: float, mc: MeshConfig) -> float:
        """Activation bytes one op keeps under full recompute: its inputs (meshplan's runtime); under Megatron-Core
        (plan_settings) only a transformer layer's first op keeps its input, ops outside the layers all they keep."""
        if not mc.megatron:
            return ckpt
        op = self.groups[g].ops[0]
        if op.layer is None:
            return act
        return ckpt if op.name in self._layer_inputs else 0.0

    def selective(self, g: str, cand: str, mc: MeshConfig, compute: float, act: float) -> tuple[float, float]:
        """(compute, activations) of one op under selective recompute (plan_settings): a norm whose output is
        read by attention / MoE / FFN runs its forward again (1/3 of its forward + backward), the MoE rebuilds its
        SwiGLU output from HBM; their consumers no longer keep the dropped tensors."""
        key = (g, cand, mc.n, mc.b, mc.modules)
        if key not in self._selective:
            op = self.groups[g].ops[0]
            self._selective[key] = plan_settings.selective(self.graph, op, cand, mc.n, mc.b, self.opt.seq,
                                                           mc.modules)
        dropped, rerun, frac = self._selective[key]
        op = self.groups[g].ops[0]
        if "layernorm" in mc.modules and op.kind == G.NORM and any(
                plan_settings.reads_norm(self.graph, self.graph.op(c)) for c in self._consumers[op.name]):
            compute *= RECOMPUTE[0]
        return compute * (1 + frac) + rerun / self.cluster.hbm_bandwidth, act - dropped

    def group_mesh(self, g: str, mc: MeshConfig) -> MeshConfig:
        """The mesh group g runs on: under MoE parallel folding, the non-MoE ops' sub-mesh (plan_settings)."""
        if mc.fold and self.groups[g].ops[0].kind != G.MOE:
            return plan_settings.sub_mesh(mc)
        return mc

    def candidates(self, g: str, mc: MeshConfig) -> list[str]:
        gi = self.groups[g]
        if self.plan is not None:
            return gi.cands
        ok = cm.candidates(gi.ops[0], mc.n, mc.b, self.opt.seq)
        return [c for c in gi.cands if c in ok and (c != DP or self.opt.dp_ops)]

    def dtypes(self, g: str, cands: list[str]) -> dict[str, tuple[str, ...]]:
        op = self.groups[g].ops[0]
        names = []
        for c in cands:
            for name in collective_names(op, "replicate" if c == DP else c):
                if name not in names:
                    names.append(name)
        if self.plan is not None:  # a plan fixes each collective's precision (default fp32)
            prec = dict(self.plan.ops[op.name].precision)
            return {c: (prec.get(c, "fp32"),) for c in names}
        return {c: allowed_precisions(c) for c in names}

    def problem(self, mc: MeshConfig) -> Problem:
        groups = {}
        for g, gi in self.groups.items():
            gm = self.group_mesh(g, mc)
            cands = self.candidates(g, gm)
            if not cands:
                raise ValueError(f"{g}: no strategy divides the model axis mp={gm.n}")
            allv = self.values(g, gm.n, gm.b)
            choices = {c: self.choice(g, c, gm, allv[gi.cands.index(c)]) for c in cands}
            groups[g] = Group(g, choices, len(gi.ops), self.dtypes(g, cands), [op.name for op in gi.ops])
        if self.opt.overlap.a2a:
            ov.other_batch(self, groups, mc)
        edges = []  # in self.edges order, which Stage.edges indexes (_compose)
        for key, pairs in self.edges.items():
            gs, gd, idx = key
            folded = mc.fold and G.MOE in (self.groups[gs].ops[0].kind, self.groups[gd].ops[0].kind)
            if folded:  # the dispatcher takes each rank's own tokens (plan_settings): nothing to reshard
                cost, err2 = {}, {}
            else:
                cost, err2 = self.edge_costs(key, list(groups[gs].choices), list(groups[gd].choices),
                                             self.group_mesh(gd, mc), groups[gd].dtypes[f"in{idx}"])
            u, v = pairs[0]
            label = {st: "reshard " + "/".join(sorted(set(cm.edge_kinds(u, st[0], v, st[1])) - {"none", "slice"}))
                     for st in cost}
            edges.append(Edge(gs, gd, f"in{idx}", len(pairs), cost, err2, groups[gd].dtypes[f"in{idx}"],
                              ov.resharding_floors(self, key, cost, groups[gs], groups[gd], mc.n), label))
        stages = self.stages(mc.pp, mc.m, mc.vp)
        limit = self.opt.mem_limit if self.opt.mem_limit is not None else self.cluster.memory_limit
        o = self.opt.overlap
        return Problem(groups, edges, stages, mc.m, mc.pp, limit, self.opt.error_budget, mc.vp, o.grad_reduce,
                       o.param_gather, o.dp_chunk)

    def edge_costs(self, key: tuple, src_cands: list[str], dst_cands: list[str], mc: MeshConfig, dtypes):
        """Resharding time (forward + backward) and squared error per (producer, consumer) strategy pair that
        communicates, for each precision of the consumer's in{i} collective."""
        u, v = self.edges[key][0]
        numel, last = self.values(key[0], mc.n, mc.b)[-1]
        local = self.locality(mc)["mp"]
        cost, err2 = {}, {}
        for s in src_cands:
            for t in dst_cands:
                kinds = cm.edge_kinds(u, s, v, t)
                if set(kinds) <= {"none", "slice"}:
                    continue
                cost[s, t], err2[s, t] = {}, {}
                for dt in dtypes:
                    nbytes = cc.wire_bytes(numel, numel / last, dt)
                    each = [self._time(k, nbytes, mc.n, local) + self.codec_time(k, numel, numel / last, dt, mc.n)
                            for k in kinds]
                    cost[s, t][dt] = sum(each) + (each[0] if mc.recompute else 0.0)
                    err2[s, t][dt] = sum(cc.relative_error(k, dt, mc.n) ** 2 for k in kinds)
        return cost, err2

    def stages(self, pp: int, m: int, vp: int = 1) -> list[Stage]:
        """The distinct stage compositions (1F1B: stage k holds min(pp - k, m) micro-batches, interleaved:
        plan_settings.inflight; of identical compositions the one holding most stands for all)."""
        key = (pp, min(pp, m), vp) if vp == 1 else (pp, m, vp)
        if key not in self._stages:
            if pp not in self._compositions:
                self._compositions[pp] = self._compose(pp)
            unique: dict[tuple, Stage] = {}
            for st in self._compositions[pp]:
                ck = (tuple(sorted(st.groups.items())), tuple(sorted(st.edges.items())),
                      tuple(sorted(st.sends.items())))
                inflight = plan_settings.inflight(pp, st.index, m, vp)
                if ck not in unique or unique[ck].inflight < inflight:
                    unique[ck] = Stage(st.groups, st.edges, st.sends, inflight, st.index, st.layers)
            self._stages[key] = list(unique.values())
        return self._stages[key]

    def _compose(self, pp: int) -> list[Stage]:
        edge_index = {k: i for i, k in enumerate(self.edges)}  # the order problem() lists edges in
        stage = stage_of_ops(self.ops, pp, self._layer)
        comp = [Stage({}, {}, {}, 1, k) for k in range(pp)]
        for k, count in enumerate(layers_per_stage(len({op.layer for op in self.ops if op.layer is not None}), pp)):
            comp[k].layers = max(count, 1)
        for op in self.ops:
            st = comp[stage[op.name]]
            g = self.group_of[op.name]
            st.groups[g] = st.groups.get(g, 0) + 1
        for key, pairs in self.edges.items():
            for u, v in pairs:
                st = comp[stage[v.name]]
                st.edges[edge_index[key]] = st.edges.get(edge_index[key], 0) + 1
        for op in self.ops:  # an output read by a later stage is sent once forward, its gradient once back
            later = {stage[c] for c in self._consumers[op.name] if c in stage and stage[c] != stage[op.name]}
            for k in {stage[op.name]} | later if later else ():
                comp[k].sends[self.group_of[op.name]] = comp[k].sends.get(self.group_of[op.name], 0) + 1
        return comp

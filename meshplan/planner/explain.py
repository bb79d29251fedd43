"""Reading a priced plan: the per-op table, and `--explain OP`: every candidate strategy of one op with its
formulas (sympy over B, S at this mesh's n) and their values, so a user can check any number by hand.
"""
from __future__ import annotations

import sympy

from ..ir import graph as G
from ..ir.strategies import PRECISIONS
from ..table import format_table
from . import collectives_cost as cc
from . import cost_model as cm
from . import memory
from .memory import N
from .mesh_search import PlannerError
from .pricing import CostModel, MeshConfig
from .problem import Assignment, Breakdown, Problem, edge_time

MS = 1e3


def _in_edges(problem: Problem, a: Assignment, g: str) -> float:
    """Resharding time on a group's input edges per instance and micro-batch."""
    total = 0.0
    for ei, e in enumerate(problem.edges):
        if e.dst == g:
            total += e.count * edge_time(ei, a, problem)[0]
    return total / problem.groups[g].count


def op_table(problem: Problem, a: Assignment, bd: Breakdown) -> str:
    rows = []
    for g, grp in problem.groups.items():
        s = a.strategy[g]
        ch = grp.choices[s]
        own = sum(t[a.dtype(g, c, problem)] for c, t in ch.colls.items())
        comm = own + _in_edges(problem, a, g)
        # per instance, on the stage holding most of the group (a typical middle stage)
        k = max((k for k, st in enumerate(problem.stages) if g in st.groups),
                key=lambda k: (problem.stages[k].groups[g], -k))
        exposed = bd.groups[k][g].exposed / problem.stages[k].groups[g]
        grad = ch.grad[a.dtype(g, "grad", problem)] if ch.grad else 0.0
        prec = ",".join(f"{c}={a.dtype(g, c, problem)}" for c in grp.dtypes
                        if c in ch.colls or (c == "grad" and grad > 0))
        rows.append([g, grp.count, "dp (axis none)" if s == memory.DP else s, f"{ch.compute * MS:.3f}",
                     f"{comm * MS:.3f}", f"{exposed * MS:.3f}", f"{grad * MS:.2f}", f"{ch.static_mem / 1e9:.3f}",
                     f"{ch.act_mem / 1e9:.3f}", prec or "-"])
    head = ["op (template)", "count", "strategy", "compute ms/mb", "comm ms/mb", "exposed ms/mb", "grad ms/step",
            "state GB", "act GB/mb", "precision"]
    return format_table(head, rows, align="lrlrrrrrrl")


def stage_table(problem: Problem, bd: Breakdown) -> str:
    rows = [[st.index, sum(st.groups.values()), st.inflight, f"{bd.stage_times[k] * MS:.3f}",
             f"{bd.memory[k] / 1e9:.2f}"] for k, st in enumerate(problem.stages)]
    return format_table(["stage", "ops", "in-flight mb", "time ms/mb", "memory GB"], rows, align="rrrrr")


def _fmt(expr, n: int) -> str:
    """An expression at this mesh's n, over B and S: integers kept exact, other constants to 4 digits."""
    e = sympy.sympify(expr).subs(N, n)
    e = e.xreplace({f: sympy.Integer(int(f)) for f in e.atoms(sympy.Float) if f == int(f)})
    e = sympy.factor(e) if e.free_symbols and not e.atoms(sympy.Min, sympy.Max) else e
    return str(sympy.N(e, 4)) if e.atoms(sympy.Float) else str(e)


def explain_op(cmodel: CostModel, mc: MeshConfig, problem: Problem, a: Assignment, name: str) -> str:
    """Formulas and values of every candidate of the op (or template) `name` on this mesh."""
    g = cmodel.group_of.get(name) or (name if name in cmodel.groups else None)
    if g is None:
        close = [k for k in list(cmodel.group_of) + list(cmodel.groups) if name.split(".")[-1] in k][:5]
        raise PlannerError(f"--explain {name!r}: no such op or template (try "
                           f"{', '.join(close) or 'layers.0.attention or layers.*.attention'})")
    gi, cl, b, seq = cmodel.groups[g], cmodel.cluster, mc.b, cmodel.opt.seq
    op, loc = gi.ops[0], cmodel.locality(mc)
    at = {G.B: b, G.S: seq, N: mc.n}
    lines = [f"{name}: {op.kind} {op.attrs}", f"group {g!r}: {len(gi.ops)} identical ops; mesh {mc}; "
             f"B = {b} sequences per replica per micro-batch, S = {seq}; training = 3x forward"]
    valid = set(problem.groups[g].choices)
    for cand in gi.cands:
        mark = "  <== chosen" if a.strategy.get(g) == cand else ""
        lines.append(f"\n[{cand}]{mark}")
        if cand not in valid:
            lines.append(f"  not a candidate on this mesh (divisibility by mp={mc.n}, S={seq} or B={b})")
            continue
        t, ch = gi.terms[cand], problem.groups[g].choices[cand]
        lines.append(f"  placement on mp: {t.input} -> {t.output}")
        lines.append(f"  FLOPs/GPU (fwd)   = {_fmt(t.flops, mc.n)} = {float(t.flops.subs(at)):.4g}")
        if t.hbm_bytes != 0:
            lines.append(f"  HBM bytes/GPU     = {_fmt(t.hbm_bytes, mc.n)} = {float(t.hbm_bytes.subs(at)):.4g}")
        if cl.kernels is not None:  # kernel-level model (kernels.py): no closed form, show the split
            split = cmodel.compute_split(g, cand, mc.n, mc.b)
            lines.append("  compute s/mb      = " + " + ".join(f"{k} {v * MS:.4f} ms" for k, v in split.items())
                         + f" = {ch.compute * MS:.4f} ms (recompute x4/3 if on)")
        elif t.gemm_dims:
            eff = cm.size_efficiency(t.gemm_dims, cl.gemm_half_size)
            lines.append(f"  GEMM dims (M,K,N) = {tuple(_fmt(x, mc.n) for x in t.gemm_dims)}; size efficiency "
                         f"prod x/(x+{cl.gemm_half_size:g}) = {float(eff.subs(at)):.4f}")
        if cl.kernels is None:
            lines.append(f"  compute s/mb      = {_fmt(cm.compute_time_expr(t, cl), mc.n)} = {ch.compute * MS:.4f} ms "
                         f"(peak {cl.peak_flops:.3g} x gemm_efficiency {cl.gemm_efficiency})")
        for coll in t.colls:
            x = coll.elems.subs(N, mc.n)
            sent = cc.traffic(coll.kind, x * cc.PRECISION_BYTES["bf16"], mc.n, loc["mp"]).bytes
            times = ", ".join(f"{dt} {ch.colls[coll.name][dt] * MS:.4f} ms" for dt in PRECISIONS)
            lines.append(f"  {coll.name}: {coll.kind}, X = {_fmt(coll.elems, mc.n)} elements; bf16 bytes sent/GPU = "
                         f"{_fmt(sent, mc.n)} = {float(sympy.sympify(sent).subs(at)):.4g}; fwd+bwd: {times}")
        for e in problem.edges:
            if e.dst != g:
                continue
            s = a.strategy.get(e.src)
            src_op = cmodel.edges[(e.src, e.dst, int(e.coll[2:]))][0][0]
            fwd, bwd = cm.edge_kinds(src_op, s, op, cand)
            cost = e.cost.get((s, cand))
            when = f"from {e.src} [{s}] x{e.count}: fwd {fwd}, bwd {bwd}"
            lines.append(f"  {e.coll} {when}" + (": " + ", ".join(f"{dt} {v * MS:.4f} ms" for dt, v in cost.items())
                                                  if cost else " (no communication)"))
        sp, rp = t.params_split.subs(N, mc.n), t.params_replicated.subs(N, mc.n)
        lines.append(f"  params/GPU: split {_fmt(sp, mc.n)} (grads over dp={mc.d}), replicated {_fmt(rp, mc.n)} "
                     f"(grads over {mc.n * mc.d})")
        zero = "ZeRO-1" if cmodel.opt.zero else "no ZeRO"
        lines.append(f"  state bytes = {memory.WEIGHT_GRAD_BYTES} x params + {memory.OPTIMIZER_BYTES} x params / "
                     f"replicas ({zero}) = {ch.static_mem / 1e9:.4f} GB")
        lines.append(f"  activations/mb = {_fmt(t.activations, mc.n)} bytes = {ch.act_mem / 1e9:.4f} GB")
        if ch.grad:
            how = "reduce-scatter (ZeRO-1)" if cmodel.opt.zero else "all-reduce"
            lines.append(f"  gradient {how} per step: " + ", ".join(f"{dt} {v * MS:.3f} ms" for dt, v in
                                                                     ch.grad.items())
                         + (f"; bf16 parameter all-gather {ch.gather * MS:.3f} ms" if ch.gather else ""))
    return "\n".join(lines)

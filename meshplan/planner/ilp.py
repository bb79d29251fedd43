"""The ILP: one strategy per op group, one precision per collective, minimising problem.evaluate's step time.

Variables (pulp, solved by CBC):
  x[g,s]        binary, one-hot: group g takes strategy s (identical layers share g, so the model's depth only
                multiplies coefficients, never adds variables)
  w[g,s,c,dt]   binary: strategy s of g is chosen and its collective c (own, or grad) runs in dt;
                sum_dt w = x[g,s]. A precision exists only with the strategy that has the collective, so no
                precision variable is ever free (free binaries make CBC branch for nothing).
  y[e,s,t]      continuous, = x[src,s]·x[dst,t], linearised by its marginals (sum_t y = x[src,s],
                sum_s y = x[dst,t]); with x integral the transportation polytope has the product as only point
  z[e,s,t,dt]   binary, for strategy pairs whose edge communicates: sum_dt z = y[e,s,t]
  E[k,g], GX[k] continuous: the exposed-communication maxima of problem.py, as two lower bounds each
  T, X          continuous: slowest stage per micro-batch, slowest stage's per-step tail
Objective (m + pp - 1)·T + X (+ a 1e-6 tie-break on every stage's own time); constraints: memory per stage,
squared-error sum <= budget². Times are in milliseconds and memory in GB so CBC's tolerances are meaningful.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

from .problem import Assignment, Problem

MS, GB = 1e3, 1e-9
TIE_BREAK = 1e-6


def _sum(terms):
    import pulp  # lazy, as in solve()
    return pulp.lpSum(terms) if terms else 0


def _solver(time_limit: float | None):
    """CBC: a system install (COIN_CMD) if there is one, else the binary bundled with pulp (PULP_CBC_CMD, which
    pulp 3.3 marks deprecated for 4.0 but still ships)."""
    import pulp  # lazy, as in solve()
    opts = dict(msg=False, gapRel=1e-9, timeLimit=time_limit)
    if pulp.COIN_CMD().available():
        return pulp.COIN_CMD(**opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**opts)


def _var(lp, name: str, cat: str = "Continuous", low: float | None = 0):
    import pulp  # lazy, as in solve()
    if hasattr(lp, "add_variable"):  # pulp >= 3.3
        return lp.add_variable(name, lowBound=low, cat=cat)
    return pulp.LpVariable(name, lowBound=low, cat=cat)


def solve(p: Problem, time_limit: float | None = None) -> tuple[Assignment, float] | None:
    """The optimal assignment and its step time (s), or None if no assignment fits the constraints."""
    import pulp  # imported on first solve: the cost model and codegen's durations need no solver
    lp = pulp.LpProblem("meshplan", pulp.LpMinimize)
    ids = {g: i for i, g in enumerate(p.groups)}
    x = {}
    for g, grp in p.groups.items():
        for s in grp.choices:
            x[g, s] = _var(lp, f"x_{ids[g]}_{s}", "Binary")
        lp += pulp.lpSum(x[g, s] for s in grp.choices) == 1

    def per_dtype(name: str, base, dts) -> dict:
        """Binary copies of the 0/1 quantity `base`, one per precision, exactly one of them on when base is."""
        if len(dts) == 1:
            return {dts[0]: base}
        v = {dt: _var(lp, f"{name}_{dt}", "Binary") for dt in dts}
        lp.addConstraint(pulp.lpSum(v.values()) == base)
        return v

    a = p.overlap
    own_time, own_floor, grad_time, gather_time, err_terms, wvars = {}, {}, {}, {}, [], {}
    for g, grp in p.groups.items():
        own, floor, grad = [], [], []
        for s, ch in grp.choices.items():
            for c, times in list(ch.colls.items()) + ([("grad", ch.grad)] if ch.grad else []):
                w = per_dtype(f"w_{ids[g]}_{s}_{c}", x[g, s], grp.dtypes[c])
                wvars[g, s, c] = w
                (grad if c == "grad" else own).extend(times[dt] * MS * w[dt] for dt in w if times[dt])
                if c != "grad":
                    floor.extend(ch.floor(c, dt, a) * MS * w[dt] for dt in w if times[dt])
                err_terms += [grp.count * ch.err2[c][dt] * w[dt] for dt in w if ch.err2.get(c, {}).get(dt)]
        own_time[g], own_floor[g], grad_time[g] = _sum(own), _sum(floor), _sum(grad)
        gather_time[g] = _sum([ch.gather * MS * x[g, s] for s, ch in grp.choices.items() if ch.gather])

    edge_time, edge_floor, zvars = {}, {}, {}
    for ei, e in enumerate(p.edges):
        src, dst = p.groups[e.src], p.groups[e.dst]
        if e.src == e.dst:  # a self-edge only ever pairs a strategy with itself
            y = {(s, t): (x[e.src, s] if s == t else 0) for s in src.choices for t in dst.choices}
        else:
            y = {(s, t): _var(lp, f"y_{ei}_{s}_{t}") for s in src.choices for t in dst.choices}
            for s in src.choices:
                lp += pulp.lpSum(y[s, t] for t in dst.choices) == x[e.src, s]
            for t in dst.choices:
                lp += pulp.lpSum(y[s, t] for s in src.choices) == x[e.dst, t]
        terms, floor = [], []
        for (s, t), times in e.cost.items():
            if isinstance(y[s, t], int):
                continue
            z = per_dtype(f"z_{ei}_{s}_{t}", y[s, t], e.dtypes)
            zvars[ei, s, t] = z
            terms += [times[dt] * MS * z[dt] for dt in z if times[dt]]
            floor += [(1 - e.hide.get((s, t), a)) * times[dt] * MS * z[dt] for dt in z if times[dt]]
            err_terms += [e.count * e.err2[s, t][dt] * z[dt] for dt in z if e.err2.get((s, t), {}).get(dt)]
        edge_time[ei], edge_floor[ei] = _sum(terms), _sum(floor)

    T, X = _var(lp, "T"), _var(lp, "X")
    # Stages off the critical path are indifferent to the main objective; a tiny weight on their own times makes
    # them well-planned too (and the solution deterministic) without changing the optimum's step time.
    tie_break = []
    for k, st in enumerate(p.stages):
        comm, floors = defaultdict(list), defaultdict(list)
        compute = {}
        for g, c in st.groups.items():
            compute[g] = c * pulp.lpSum(ch.compute * MS * x[g, s] for s, ch in p.groups[g].choices.items())
            comm[g].append(c * own_time[g])
            floors[g].append(c * own_floor[g])
        for ei, c in st.edges.items():
            comm[p.edges[ei].dst].append(c * edge_time[ei])
            floors[p.edges[ei].dst].append(c * edge_floor[ei])
        exposed = []
        for g in st.groups:
            E = _var(lp, f"E_{k}_{ids[g]}")
            cm = pulp.lpSum(comm[g])
            lp += E >= pulp.lpSum(floors[g])
            lp += E >= cm - compute[g]
            exposed.append(E)
        p2p = [c * ch.p2p * MS * x[g, s] for g, c in st.sends.items() for s, ch in p.groups[g].choices.items()
               if ch.p2p]
        total_compute = pulp.lpSum(compute.values())
        stage_time = total_compute + pulp.lpSum(exposed) + _sum(p2p)
        lp += T >= stage_time
        grad = pulp.lpSum(c * grad_time[g] for g, c in st.groups.items())
        GX = _var(lp, f"GX_{k}")
        lp += GX >= (1 - a) * grad
        lp += GX >= grad - 2 / 3 * total_compute
        gather = pulp.lpSum(c * gather_time[g] for g, c in st.groups.items())
        PX = _var(lp, f"PX_{k}")
        lp += PX >= (1 - a) * gather
        lp += PX >= gather - 1 / 3 * total_compute
        opt = _sum([c * ch.opt_time * MS * x[g, s] for g, c in st.groups.items()
                    for s, ch in p.groups[g].choices.items() if ch.opt_time])
        lp += X >= GX + PX + opt
        tie_break += [stage_time, GX + PX + opt]
        if p.mem_limit < float("inf"):
            mem = [c * (ch.static_mem + st.inflight * ch.act_mem) * GB * x[g, s]
                   for g, c in st.groups.items() for s, ch in p.groups[g].choices.items()]
            lp += pulp.lpSum(mem) <= p.mem_limit * GB
    if p.error_budget is not None and err_terms:
        if p.error_budget > 0:
            lp += pulp.lpSum(err_terms) * (1.0 / p.error_budget ** 2) <= 1
        else:
            lp += pulp.lpSum(err_terms) <= 0
    step = (p.microbatches + p.pp - 1) * T + X
    lp += step + TIE_BREAK * pulp.lpSum(tie_break)
    status = lp.solve(_solver(time_limit))
    if pulp.LpStatus[status] != "Optimal":
        return None

    def on(v) -> bool:
        return (v if isinstance(v, (int, float)) else pulp.value(v) or 0) > 0.5

    strategy = {g: max(grp.choices, key=lambda s: pulp.value(x[g, s]) or 0) for g, grp in p.groups.items()}
    precision = {(g, c): next(dt for dt, v in w.items() if on(v))
                 for (g, s, c), w in wvars.items() if s == strategy[g]}
    edge_precision = {}
    for (ei, s, t), z in zvars.items():
        e = p.edges[ei]
        if (s, t) == (strategy[e.src], strategy[e.dst]):
            edge_precision[ei] = next(dt for dt, v in z.items() if on(v))
    return Assignment(strategy, precision, edge_precision), pulp.value(step) / MS

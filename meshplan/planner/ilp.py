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
  GX[k], PX[k]  continuous: the exposed gradient-sync / parameter-gather maxima of problem.py, two lower bounds
                each (exposed communication per micro-batch is linear: precomputed per choice, overlap.py)
  T, X          continuous: slowest stage per micro-batch, slowest stage's per-step tail
Objective (m + pp - 1)·T + X (+ a 1e-6 tie-break on every stage's own time); constraints: memory per stage,
squared-error sum <= budget². Times are in milliseconds and memory in GB so CBC's tolerances are meaningful.
"""
from __future__ import annotations

import warnings

from .problem import Assignment, Problem

MS, GB = 1e3, 1e-9
TIE_BREAK = 1e-6


def _sum(terms):
    import pulp  # lazy, as in StepTimeILP
    return pulp.lpSum(terms) if terms else 0


def _solver(time_limit: float | None):
    """CBC: a system install (COIN_CMD) if there is one, else the binary bundled with pulp (PULP_CBC_CMD, which
    pulp 3.3 marks deprecated for 4.0 but still ships)."""
    import pulp  # lazy, as in StepTimeILP
    opts = dict(msg=False, gapRel=1e-9, timeLimit=time_limit)
    if pulp.COIN_CMD().available():
        return pulp.COIN_CMD(**opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**opts)


def _var(lp, name: str, cat: str = "Continuous", low: float | None = 0):
    import pulp  # lazy, as in StepTimeILP
    if hasattr(lp, "add_variable"):  # pulp >= 3.3
        return lp.add_variable(name, lowBound=low, cat=cat)
    return pulp.LpVariable(name, lowBound=low, cat=cat)


def solve(p: Problem, time_limit: float | None = None) -> tuple[Assignment, float] | None:
    """The optimal assignment and its step time (s), or None if no assignment fits the constraints."""
    return StepTimeILP(p).solve(time_limit)


class StepTimeILP:
    """The ILP of one Problem, built one named family of variables and constraints at a time (the shape of
    autoparallel's ShardingOptimizer): strategy choice, precisions of each group's collectives, edge pairs, per-stage
    time, tails and memory, the error budget, the objective."""

    def __init__(self, p: Problem):
        import pulp  # imported on first solve: the cost model and codegen's durations need no solver

        self.pulp, self.p = pulp, p
        self.lp = pulp.LpProblem("meshplan", pulp.LpMinimize)
        self.ids = {g: i for i, g in enumerate(p.groups)}
        self.x, self.wvars, self.zvars, self.err_terms, self.tie_break = {}, {}, {}, [], []
        self.own_time, self.own_floor, self.grad_time, self.gather_time = {}, {}, {}, {}
        self.edge_time, self.edge_floor = {}, {}
        self.add_unique_strategy_constraint()
        self.add_group_collectives()
        self.add_edge_pairs()
        self.T, self.X = _var(self.lp, "T"), _var(self.lp, "X")
        for k, st in enumerate(p.stages):
            self.add_stage_constraints(k, st)
        self.add_error_budget_constraint()
        self.step = (p.microbatches + p.bubble_slots) * self.T + self.X
        self.set_objective()

    def per_dtype(self, name: str, base, dts) -> dict:
        """Binary copies of the 0/1 quantity `base`, one per precision, exactly one of them on when base is."""
        if len(dts) == 1:
            return {dts[0]: base}
        v = {dt: _var(self.lp, f"{name}_{dt}", "Binary") for dt in dts}
        self.lp.addConstraint(self.pulp.lpSum(v.values()) == base)
        return v

    def add_unique_strategy_constraint(self) -> None:
        """x[g,s]: each group takes exactly one strategy."""
        for g, grp in self.p.groups.items():
            for s in grp.choices:
                self.x[g, s] = _var(self.lp, f"x_{self.ids[g]}_{s}", "Binary")
            self.lp += self.pulp.lpSum(self.x[g, s] for s in grp.choices) == 1

    def add_group_collectives(self) -> None:
        """w[g,s,c,dt]: a precision per collective of the chosen strategy; each group's own, exposed-floor,
        gradient and parameter-gather times, and its squared-error terms."""
        x = self.x
        for g, grp in self.p.groups.items():
            own, floor, grad = [], [], []
            for s, ch in grp.choices.items():
                for c, times in list(ch.colls.items()) + ([("grad", ch.grad)] if ch.grad else []):
                    w = self.per_dtype(f"w_{self.ids[g]}_{s}_{c}", x[g, s], grp.dtypes[c])
                    self.wvars[g, s, c] = w
                    (grad if c == "grad" else own).extend(times[dt] * MS * w[dt] for dt in w if times[dt])
                    if c != "grad":
                        # a `together` collective in a non-async precision: all exposed (the others are then too)
                        exposed = {dt: times[dt] if c in ch.together and dt not in ch.async_dtypes
                                   else ch.floor(c, dt) for dt in w}
                        floor.extend(exposed[dt] * MS * w[dt] for dt in w if exposed[dt])
                    self.err_terms += [grp.count * ch.err2[c][dt] * w[dt] for dt in w
                                       if ch.err2.get(c, {}).get(dt)]
                self.async_together(g, s, ch)
            self.own_time[g], self.own_floor[g], self.grad_time[g] = _sum(own), _sum(floor), _sum(grad)
            self.gather_time[g] = _sum([ch.gather * MS * x[g, s] for s, ch in grp.choices.items() if ch.gather])

    def async_together(self, g: str, s: str, ch) -> None:
        """Choice.together: its collectives are all in an async precision or none is (equal async indicators), so
        their floors hold exactly where the ILP prices them."""
        ind = []
        for c in ch.together:
            w = self.wvars[g, s, c]
            ind.append(self.pulp.lpSum(w[dt] for dt in w if dt in ch.async_dtypes))
        for a, b in zip(ind, ind[1:]):
            self.lp += a == b

    def _edge_pair_vars(self, ei: int, e) -> dict:
        """y[e,s,t] = x[src,s]·x[dst,t], linearised by its marginals (a self-edge pairs a strategy with itself)."""
        src, dst, x, lp = self.p.groups[e.src], self.p.groups[e.dst], self.x, self.lp
        if e.src == e.dst:
            return {(s, t): (x[e.src, s] if s == t else 0) for s in src.choices for t in dst.choices}
        y = {(s, t): _var(lp, f"y_{ei}_{s}_{t}") for s in src.choices for t in dst.choices}
        for s in src.choices:
            lp += self.pulp.lpSum(y[s, t] for t in dst.choices) == x[e.src, s]
        for t in dst.choices:
            lp += self.pulp.lpSum(y[s, t] for s in src.choices) == x[e.dst, t]
        return y

    def add_edge_pairs(self) -> None:
        """z[e,s,t,dt]: a precision per communicating strategy pair of each edge; the edge's times and errors."""
        for ei, e in enumerate(self.p.edges):
            y = self._edge_pair_vars(ei, e)
            terms, floor = [], []
            for (s, t), times in e.cost.items():
                if isinstance(y[s, t], int):
                    continue
                z = self.per_dtype(f"z_{ei}_{s}_{t}", y[s, t], e.dtypes)
                self.zvars[ei, s, t] = z
                terms += [times[dt] * MS * z[dt] for dt in z if times[dt]]
                exposed = e.floor.get((s, t), times)
                floor += [exposed[dt] * MS * z[dt] for dt in z if exposed[dt]]
                self.err_terms += [e.count * e.err2[s, t][dt] * z[dt] for dt in z
                                   if e.err2.get((s, t), {}).get(dt)]
            self.edge_time[ei], self.edge_floor[ei] = _sum(terms), _sum(floor)

    def _stage_time(self, k: int, st):
        """One stage's time per micro-batch: compute + exposed communication per group (E, two lower bounds) +
        pipeline sends. Returns (stage time, total compute)."""
        pulp, p, x = self.pulp, self.p, self.x
        compute, exposed = {}, []
        for g, c in st.groups.items():
            compute[g] = c * pulp.lpSum(ch.compute * MS * x[g, s] for s, ch in p.groups[g].choices.items())
            exposed.append(c * self.own_floor[g])
        for ei, c in st.edges.items():
            exposed.append(c * self.edge_floor[ei])
        p2p = [c * ch.p2p * MS * x[g, s] for g, c in st.sends.items() for s, ch in p.groups[g].choices.items()
               if ch.p2p]
        total_compute = pulp.lpSum(compute.values())
        return total_compute + pulp.lpSum(exposed) + _sum(p2p), total_compute

    def _stage_tail(self, k: int, st, total_compute):
        """The per-step tail after a stage's last micro-batch: exposed gradient reduction (GX), exposed parameter
        gathers (PX) and the optimizer step."""
        pulp, p, x, lp = self.pulp, self.p, self.x, self.lp
        chunks = p.dp_chunks(st)
        grad = pulp.lpSum(c * self.grad_time[g] for g, c in st.groups.items())
        gather = pulp.lpSum(c * self.gather_time[g] for g, c in st.groups.items())
        GX, PX = _var(lp, f"GX_{k}"), _var(lp, f"PX_{k}")
        for var, total, overlapped, share in ((GX, grad, p.grad_overlap, 2 / 3), (PX, gather, p.gather_overlap, 1 / 3)):
            lp += var >= (total / chunks if overlapped else total)
            if overlapped:
                lp += var >= total - share * total_compute
        opt = _sum([c * ch.opt_time * MS * x[g, s] for g, c in st.groups.items()
                    for s, ch in p.groups[g].choices.items() if ch.opt_time])
        return GX + PX + opt

    def add_stage_constraints(self, k: int, st) -> None:
        """T >= every stage's time, X >= every stage's tail, and each stage's memory within the limit."""
        stage_time, total_compute = self._stage_time(k, st)
        self.lp += self.T >= stage_time
        tail = self._stage_tail(k, st, total_compute)
        self.lp += self.X >= tail
        # Stages off the critical path are indifferent to the main objective; a tiny weight on their own times
        # makes them well-planned too (and the solution deterministic) without changing the optimum's step time.
        self.tie_break += [stage_time, tail]
        if self.p.mem_limit < float("inf"):
            mem = [c * (ch.static_mem + st.inflight * ch.act_mem) * GB * self.x[g, s]
                   for g, c in st.groups.items() for s, ch in self.p.groups[g].choices.items()]
            self.lp += self.pulp.lpSum(mem) <= self.p.mem_limit * GB

    def add_error_budget_constraint(self) -> None:
        """Sum of squared relative errors <= budget² (errors add in variance)."""
        budget = self.p.error_budget
        if budget is None or not self.err_terms:
            return
        if budget > 0:
            self.lp += self.pulp.lpSum(self.err_terms) * (1.0 / budget ** 2) <= 1
        else:
            self.lp += self.pulp.lpSum(self.err_terms) <= 0

    def set_objective(self) -> None:
        self.lp += self.step + TIE_BREAK * self.pulp.lpSum(self.tie_break)

    def solve(self, time_limit: float | None = None) -> tuple[Assignment, float] | None:
        status = self.lp.solve(_solver(time_limit))
        if self.pulp.LpStatus[status] != "Optimal":
            return None
        return self.assignment(), self.pulp.value(self.step) / MS

    def assignment(self) -> Assignment:
        """The solved strategy of each group and precision of each chosen collective and edge."""
        value, p = self.pulp.value, self.p

        def on(v) -> bool:
            return (v if isinstance(v, (int, float)) else value(v) or 0) > 0.5

        strategy = {g: max(grp.choices, key=lambda s: value(self.x[g, s]) or 0) for g, grp in p.groups.items()}
        precision = {(g, c): next(dt for dt, v in w.items() if on(v))
                     for (g, s, c), w in self.wvars.items() if s == strategy[g]}
        edge_precision = {}
        for (ei, s, t), z in self.zvars.items():
            e = p.edges[ei]
            if (s, t) == (strategy[e.src], strategy[e.dst]):
                edge_precision[ei] = next(dt for dt, v in z.items() if on(v))
        return Assignment(strategy, precision, edge_precision)

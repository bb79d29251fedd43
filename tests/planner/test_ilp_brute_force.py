"""The ILP's optimum equals brute force over every strategy and precision assignment (problem.evaluate), on
random small problems: random costs, exposed parts, edges, stages, memory limits, error budgets and gradient /
parameter-gather overlap."""
import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshplan.planner import ilp
from meshplan.planner.problem import Assignment, Choice, Edge, Group, Problem, Stage, evaluate

DTS = ("fp32", "bf16", "fp8")


@st.composite
def problems(draw):
    ms = st.integers(0, 20).map(lambda x: x * 1e-3)  # times on a coarse grid (s)
    n_groups = draw(st.integers(1, 3))
    groups = {}
    for gi in range(n_groups):
        name = f"g{gi}"
        choices, dtypes = {}, {}
        for ci in range(draw(st.integers(1, 3))):
            ch = Choice(compute=draw(ms), static_mem=draw(st.integers(0, 4)) * 1e9,
                        act_mem=draw(st.integers(0, 3)) * 1e9, opt_time=draw(ms) / 10, p2p=draw(ms) / 4)
            for c in [f"c{ci}{j}" for j in range(draw(st.integers(0, 2)))]:
                dts = draw(st.sampled_from([("fp32",), ("fp32", "bf16"), DTS]))
                dtypes[c] = dts
                ch.colls[c] = {dt: draw(ms) for dt in dts}
                ch.floors[c] = {dt: t * draw(st.sampled_from([0.0, 0.5, 1.0])) for dt, t in ch.colls[c].items()}
                ch.err2[c] = {dt: (0.0 if dt == "fp32" else draw(st.integers(1, 4)) * 1e-4) for dt in dts}
            if draw(st.booleans()):  # chunked: floors only while all of them are fp32
                ch.together = tuple(ch.colls)
            if draw(st.booleans()):
                dtypes["grad"] = ("fp32", "bf16")
                ch.grad = {"fp32": draw(ms), "bf16": draw(ms)}
                ch.err2["grad"] = {"fp32": 0.0, "bf16": draw(st.integers(1, 4)) * 1e-4}
            choices[f"s{ci}"] = ch
        groups[name] = Group(name, choices, draw(st.integers(1, 3)), dtypes)
    names = list(groups)
    edges = []
    for ei in range(draw(st.integers(0, 2))):
        src, dst = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        dts = draw(st.sampled_from([("fp32",), ("bf16", "fp8"), DTS]))
        cost, err2 = {}, {}
        for s in groups[src].choices:
            for t in groups[dst].choices:
                if (src != dst or s == t) and draw(st.booleans()):
                    cost[s, t] = {dt: draw(ms) for dt in dts}
                    err2[s, t] = {dt: (0.0 if dt == "fp32" else draw(st.integers(1, 4)) * 1e-4) for dt in dts}
        floor = {k: {dt: t * draw(st.sampled_from([0.0, 0.5, 1.0])) for dt, t in v.items()} for k, v in cost.items()}
        edges.append(Edge(src, dst, f"in{ei}", draw(st.integers(1, 3)), cost, err2, dts, floor))
    stages = []
    for k in range(draw(st.integers(1, 2))):
        present = [g for g in names if draw(st.booleans())] or names[:1]
        stages.append(Stage({g: draw(st.integers(1, 3)) for g in present},
                            {ei: draw(st.integers(1, 2)) for ei, e in enumerate(edges) if e.dst in present},
                            {g: 1 for g in present if draw(st.booleans())}, draw(st.integers(1, 3)), k,
                            draw(st.integers(1, 4))))
    limit = draw(st.one_of(st.just(math.inf), st.integers(2, 20).map(lambda x: (x + 0.5) * 1e9)))
    budget = draw(st.one_of(st.none(), st.integers(0, 8).map(lambda x: math.sqrt((x + 0.5) * 1e-4))))
    return Problem(groups, edges, stages, draw(st.integers(1, 4)), draw(st.integers(1, 3)), limit, budget,
                   draw(st.integers(1, 2)), draw(st.booleans()), draw(st.booleans()),
                   draw(st.sampled_from(["layer", "virtual_stage"])))


def _mixed(ch, dtype_of) -> bool:
    kinds = {dtype_of(c) in ch.async_dtypes for c in ch.together}
    return len(kinds) > 1


def brute_force(p: Problem):
    best = None
    names = list(p.groups)
    for combo in itertools.product(*(list(p.groups[g].choices) for g in names)):
        strategy = dict(zip(names, combo))
        slots = []  # (key, dtypes) of every precision that matters under this strategy
        for g in names:
            ch = p.groups[g].choices[strategy[g]]
            slots += [(("own", g, c), p.groups[g].dtypes[c]) for c in ch.colls]
            if ch.grad:
                slots.append((("own", g, "grad"), p.groups[g].dtypes["grad"]))
        for ei, e in enumerate(p.edges):
            if (strategy[e.src], strategy[e.dst]) in e.cost:
                slots.append((("edge", ei), e.dtypes))
        for dts in itertools.product(*(d for _, d in slots)):
            a = Assignment(strategy, {}, {})
            for (key, _), dt in zip(slots, dts):
                if key[0] == "own":
                    a.precision[key[1], key[2]] = dt
                else:
                    a.edge_precision[key[1]] = dt
            if any(_mixed(p.groups[g].choices[strategy[g]], lambda c, g=g: a.dtype(g, c, p)) for g in names):
                continue  # the ILP keeps a choice's `together` collectives all async or none
            bd = evaluate(p, a)
            if bd.feasible and (best is None or bd.step < best):
                best = bd.step
    return best


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems())
def test_ilp_matches_brute_force(p):
    expected = brute_force(p)
    got = ilp.solve(p)
    if expected is None:
        assert got is None
        return
    assert got is not None
    a, step = got
    assert step == pytest.approx(expected, rel=1e-6, abs=1e-9)
    bd = evaluate(p, a)  # the ILP's assignment really achieves its objective and is feasible
    assert bd.feasible and bd.step == pytest.approx(expected, rel=1e-6, abs=1e-9)

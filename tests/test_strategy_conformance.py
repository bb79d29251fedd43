"""Every (op kind, strategy) pair is stated once, in its Strategy object (meshplan/ir/strategies), and every stage
agrees with it: the runtime has an implementation for it, the planner's cost terms and codegen's phases are its
phases, and on the tiny and small reference models (and a user model of plain nn.Linear/nn.Embedding) the
planner's per-rank parameter count equals the elements each rank holds, and the strategy's bytes per collective
equal what each rank sends (runtime/comm_stats.py), forward and backward."""
import dataclasses

import pytest
import sympy
import torch
import torch.nn as nn

from meshplan.codegen.emit import EMITTED, RECIPES
from meshplan.codegen.phases import OpView, op_phases
from meshplan.ir import Mesh, Plan, trace
from meshplan.ir import graph as G
from meshplan.ir.graph import N, dtype_size
from meshplan.ir.strategies import (
    COMBINE,
    DISPATCH,
    STRATEGIES,
    collective_names,
    divisibility_error,
    native_io,
    offered_error,
)
from meshplan.measure.volumes import routed_rows
from meshplan.models import build_model, load_config
from meshplan.planner import collectives_cost as cc
from meshplan.planner import cost_model as cm
from meshplan.planner.memory import DP, param_split
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.comm_stats import BWD, FWD
from meshplan.runtime.device_mesh import local_tensor
from meshplan.runtime.implementations import IMPLEMENTATIONS

PAIRS = [(kind, s) for kind, by_name in STRATEGIES.items() for s in by_name]
KINDS = {"all_to_all", "all_gather", "reduce_scatter", "all_reduce"}
BATCH, SEQ = 4, 16


class UserModel(nn.Module):
    """A user's model of torch modules: embedding, a biased nn.Linear (the LINEAR kind), an output projection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.emb(ids))))


def _build(name):
    return UserModel() if name == "user" else build_model(load_config(name))


@pytest.fixture(scope="module")
def graphs():
    return {name: trace(_build(name)) for name in ("tiny", "small", "user")}


def _example(graphs, kind, strategy):
    """(graph, op) of this kind that meshplan runs exactly under the strategy, from the first model that has one."""
    for graph in graphs.values():
        for op in graph.ops():
            if op.kind == kind and offered_error(op, strategy) is None:
                return graph, op
    pytest.fail(f"no op of kind {kind} runs {strategy} in the reference models")


def test_every_implementation_is_a_registered_pair():
    assert set(IMPLEMENTATIONS) <= set(PAIRS)


@pytest.mark.parametrize("kind,strategy", PAIRS)
def test_pair_has_implementation_cost_terms_and_phases(graphs, kind, strategy):
    strat = STRATEGIES[kind][strategy]
    assert kind == G.GENERIC or (kind, strategy) in IMPLEMENTATIONS  # generic ops run their own fx node
    graph, op = _example(graphs, kind, strategy)
    for io in strat.io:
        phases = strat.phases(op, io) + strat.inline(op, io)
        names = [p.name for p in phases]
        assert len(set(names)) == len(names) and not strat.phases(op, io)[-1].comm  # the last phase computes
        for i, p in enumerate(strat.phases(op, io)):
            assert set(p.after) <= set(names[:i]), (p.name, p.after)
        for p in phases:
            if p.comm:
                assert p.collective in KINDS
                assert sympy.sympify(p.elements).free_symbols <= {G.B, G.S, N}
                assert float(sympy.sympify(p.elements).subs({G.B: 2, G.S: 8, N: 2})) > 0
    # the planner's own collectives are the strategy's precision-choosable comm phases, expression for expression
    io = native_io(op, strategy)
    want = [(p.name, p.collective, p.elements, p.rows) for p in strat.comm_phases(op, io) if p.dtype is None]
    terms = cm.terms(op, strategy)
    assert [(c.name, c.kind, c.elems, c.rows) for c in terms.colls] == want
    assert {c.name for c in terms.colls} <= set(collective_names(op, strategy))
    assert sympy.simplify(terms.params_split + terms.params_replicated - op.params).subs(N, 1) == 0
    # codegen's phases are the strategy's, with its bytes
    if divisibility_error(op, strategy, "mp", 2) is None:
        plan = Plan.build(graph, Mesh.of(mp=2), {op.name: strategy}, fallback=False)
        v = OpView(graph, plan, op, BATCH, SEQ)
        got, specs = op_phases(v), strat.phases(op, v.model_io())
        assert [p.name for p in got] == [p.name for p in specs]
        for ph, spec in zip(got, specs):
            if spec.comm:
                elem = dtype_size(spec.dtype or op.output.dtype)
                assert ph.nbytes == float(spec.elements.subs({G.B: BATCH, G.S: SEQ, N: 2})) * elem
    # the planner prices chunked overlap for exactly the strategies codegen emits as chunks (Strategy.chunked)
    assert strat.chunked == ((kind, strategy) in EMITTED)
    if (kind, strategy) in EMITTED:  # the emitted overlap code has a statement for every phase
        assert {p.name for p in strat.phases(op, io)} <= set(RECIPES[(kind, strategy)])


def _rounds(graph, n):
    """Strategy choices (kind -> strategy) that together give every pair the model has to some op."""
    by_kind = {k: [s for s in STRATEGIES[k] if all(divisibility_error(op, s, "mp", n) is None
                                                   for op in graph.ops() if op.kind == k)]
               for k in {op.kind for op in graph.ops()} if k in STRATEGIES}
    return [{k: ss[i % len(ss)] for k, ss in by_kind.items() if ss} for i in range(max(map(len, by_kind.values())))]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", ["tiny", "small", "user"])
def test_planner_counts_what_each_rank_holds(graphs, name, n):
    """n = 4 on tiny: fewer KV heads (2) than ranks, so attention tp keeps wk/wv whole on every rank."""
    graph, mesh = graphs[name], Mesh.of(mp=n)
    world = LocalWorld(n)
    groups = world.groups(mesh)
    seen, rounds = set(), _rounds(graph, n)
    for choice in rounds:
        plan = Plan.build(graph, mesh, choice)

        def held(r, plan=plan):
            pm = ParallelModel(_build(name), plan, graph=graph, groups=groups[r])
            return {k: local_tensor(p).numel() for k, p in pm.named_parameters()}

        per_rank = world.run(held)
        for op in graph.ops():
            p = plan.ops.get(op.name)
            if p is None or not op.params:
                continue
            size = mesh.axis_size(p.axis) if p.axis else 1
            split, whole = param_split(op, p.strategy if p.axis else DP)
            want = int(sympy.sympify(split + whole).subs(N, size))
            for r, numels in enumerate(per_rank):
                got = sum(v for k, v in numels.items() if k.startswith(op.name + "."))
                assert got == want, f"{op.name} {p.strategy} n={n} rank {r}: runtime holds {got}, planner {want}"
            seen.add((op.kind, p.strategy))
    held_by = {op.kind for op in graph.ops() if op.params}
    assert {(k, s) for choice in rounds for k, s in choice.items() if k in held_by} <= seen


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_strategy_bytes_equal_what_each_rank_sends(graphs, name, n):
    """Every strategy with a collective inside (Ulysses attention, EP MoE, vocab-parallel embedding) in one plan,
    one training step: each collective's bytes per rank are the strategy's elements through the bandwidth-optimal
    algorithm (collectives_cost.traffic; comm_stats counts the same), the backward sends its mirror, integer
    collectives have none. EP's dispatch and combine depend on the routing: they are checked per row against the
    rows the single-device router sends off each rank (measure/volumes.routed_rows)."""
    cfg, graph, mesh = load_config(name), graphs[name], Mesh.of(mp=n)
    plan = Plan.build(graph, mesh, {G.ATTENTION: "sp", G.MOE: "ep", G.EMBEDDING: "vocab"}, fallback=False)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    world = LocalWorld(n)
    groups = world.groups(mesh)

    def step(r):
        pm = ParallelModel(build_model(cfg), plan, graph=graph, groups=groups[r])
        pm(tokens).pow(2).mean().backward()
        return pm.comm_stats

    stats = world.run(step)
    rows = iter(routed_rows(build_model(cfg), tokens, n))
    checked = set()
    for op in graph.ops():
        p = plan.ops.get(op.name)
        strat = STRATEGIES.get(op.kind, {}).get(p.strategy) if p else None
        if strat is None:
            continue
        io = (p.input[0], p.output[0])
        specs = strat.comm_phases(op, io) + strat.inline(op, io)
        layer_rows = next(rows) if op.kind == G.MOE else None
        for r, st in enumerate(stats):
            own = {k.tag for k in st.bytes if k.op == op.name and k.phase == FWD and not k.tag.startswith("in")}
            assert own == {s.name for s in specs}, (op.name, own)
        for spec in specs:
            elem = dtype_size(spec.dtype or op.output.dtype)
            x = float(spec.elements.subs({G.B: BATCH, G.S: SEQ, N: n})) * elem
            for r, st in enumerate(stats):
                if spec.name in (DISPATCH, COMBINE):  # the rows this rank sends off-rank, at the strategy's row size
                    sent, received = layer_rows[r]
                    per_row = x / float(spec.rows.subs({G.B: BATCH, G.S: SEQ, N: n}))
                    want = (sent if spec.name == DISPATCH else received) * per_row
                    back = (received if spec.name == DISPATCH else sent) * per_row  # the reverse exchange
                else:
                    want = back = cc.traffic(spec.collective, x, n, n).bytes
                fwd, bwd = (st.total(op=op.name, tag=spec.name, phase=ph) for ph in (FWD, BWD))
                assert fwd == pytest.approx(want), (op.name, spec.name, r)
                assert bwd == (0 if spec.dtype else pytest.approx(back)), (op.name, spec.name, r)
            checked.add((op.kind, spec.name))
    assert {kind for kind, _ in checked} == {G.ATTENTION, G.MOE, G.EMBEDDING}


def test_a_new_pair_is_its_object_and_an_implementation(graphs, monkeypatch):
    """docs/concepts.md, "Adding a strategy": a pair registered only as a Strategy object and one registry line is
    offered, priced, scheduled, laid out and run by every stage, with no stage naming it (a twin of FFN tp, run by
    the same implementation, must be priced and held exactly like tp and compute the single-device output)."""
    twin = dataclasses.replace(STRATEGIES[G.FFN]["tp"], name="tp_twin")
    monkeypatch.setitem(STRATEGIES[G.FFN], "tp_twin", twin)
    monkeypatch.setitem(IMPLEMENTATIONS, (G.FFN, "tp_twin"), IMPLEMENTATIONS[(G.FFN, "tp")])
    cfg, graph, mesh = load_config("small"), graphs["small"], Mesh.of(mp=2)
    op = next(op for op in graph.ops() if op.kind == G.FFN)
    assert "tp_twin" in cm.candidates(op, 2, BATCH, SEQ)
    new, old = cm.terms(op, "tp_twin"), cm.terms(op, "tp")
    for field in ("flops", "hbm_bytes", "gemm_dims", "colls", "params_split", "params_replicated", "activations"):
        assert getattr(new, field) == getattr(old, field), field
    plan = Plan.build(graph, mesh, {G.FFN: "tp_twin"}, fallback=False)
    assert [p.name for p in op_phases(OpView(graph, plan, op, BATCH, SEQ))] == ["compute"]
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    world = LocalWorld(2)
    groups = world.groups(mesh)

    def run(r):
        pm = ParallelModel(build_model(cfg), plan, graph=graph, groups=groups[r])
        held = sum(local_tensor(p).numel() for k, p in pm.named_parameters() if k.startswith(op.name + "."))
        return pm(tokens).detach(), held

    want = int(sympy.sympify(new.params_split + new.params_replicated).subs(N, 2))
    reference = build_model(cfg)(tokens).detach()
    for out, held in world.run(run):
        assert held == want < op.params
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

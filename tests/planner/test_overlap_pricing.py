"""Overlap per collective (planner/overlap.py): what hides is the min of a collective's time and the compute that
really runs beside it, by the schedule that runs the plan."""
import pytest

from meshplan.codegen.emit import overlapped
from meshplan.ir import graph as G
from meshplan.planner import CostModel, MeshConfig, Options
from meshplan.planner.overlap import (
    MESHPLAN,
    Overlap,
    chunked_hidden,
    other_batch_hidden,
    steady_fraction,
    tp_hidden,
)
from meshplan.planner.problem import Assignment, Choice, Group, Problem, Stage, stage_tail

MOE = "layers.*.feed_forward"


def test_hidden_is_a_min_of_two_durations():
    # two chunks: piece 0 beside the next chunk's `before` phase, piece 1 beside the previous chunk's `after`
    assert chunked_hidden(4.0, 10.0, 10.0, 2) == pytest.approx(4.0)  # ample compute: all of it
    assert chunked_hidden(4.0, 1.0, 3.0, 2) == pytest.approx(0.5 + 1.5)  # compute-bound: the compute's halves
    assert chunked_hidden(4.0, 10.0, 10.0, 1) == 0.0  # one chunk: nothing runs beside it
    assert tp_hidden(8.0, 100.0, 4) == pytest.approx(6.0)  # all chunks but the first
    assert tp_hidden(8.0, 1.0, 4) == pytest.approx(1.0)  # no longer than the GEMM
    assert other_batch_hidden(3.0, 2.0, 0.5) == pytest.approx(1.0)
    assert steady_fraction(8, 128, 4) == pytest.approx(1 - 38 / 512)  # Megatron's interleaved warm-up chunks


def _ep_choice(graph, h800, overlap, n_layers=2):
    g = graph("internal-352b", n_layers=n_layers)
    cm = CostModel(g, h800, Options(seq=8192, overlap=overlap))
    mc = MeshConfig(8, 1, 1, 1, 4)
    return cm, mc, cm.choice(MOE, "ep", mc)


def test_ep_all_to_all_without_independent_compute_is_exposed(graph, h800):
    _, _, ch = _ep_choice(graph, h800, Overlap(chunks=0))
    for name in ("dispatch", "combine"):
        assert ch.floors[name] == ch.colls[name]


def test_meshplan_chunks_hide_fp32_all_to_alls_behind_the_other_chunk_only(graph, h800):
    """meshplan's runtime runs compressed collectives synchronously (codegen.emit.overlapped): only fp32 hides,
    and no more than the op's own compute beside it."""
    _, _, ch = _ep_choice(graph, h800, MESHPLAN)
    assert overlapped(G.MOE, "ep", "fp32") and not overlapped(G.MOE, "ep", "bf16")
    hidden = sum(ch.colls[n]["fp32"] - ch.floors[n]["fp32"] for n in ("dispatch", "combine"))
    assert 0 < hidden <= ch.compute
    assert all(ch.floors[n][dt] == ch.colls[n][dt] for n in ("dispatch", "combine") for dt in ("bf16", "fp8"))


def test_dual_batch_overlap_hides_up_to_the_other_micro_batch(graph, h800):
    """moe_a2a_overlap: the routed all-to-alls hide behind the layer's compute of another micro-batch, in the
    steady state only: min(1, layer compute / all-to-all time) of them, times the steady fraction."""
    cm, mc, _ = _ep_choice(graph, h800, Overlap(chunks=0, a2a=True))
    p = cm.problem(mc)
    ch = p.groups[MOE].choices["ep"]
    total = sum(ch.colls[n]["bf16"] for n in ("dispatch", "combine"))
    layer = sum(p.groups[cm.group_of[op.name]].choices[s].compute for op in cm.ops if op.layer == 0
                for s in [min(p.groups[cm.group_of[op.name]].choices,
                              key=lambda c: p.groups[cm.group_of[op.name]].choices[c].compute)])
    steady = steady_fraction(mc.pp, mc.m, mc.vp)
    exposed = sum(ch.floors[n]["bf16"] for n in ("dispatch", "combine"))
    assert exposed == pytest.approx(total - steady * min(total, layer))
    assert 0 < steady < 1


def _tail(grad, compute, overlap, layers=4):
    ch = Choice(compute=compute, grad={"fp32": grad})
    p = Problem({"g": Group("g", {"s": ch}, 1, {"grad": ("fp32",)})}, [], [Stage({"g": 1}, {}, layers=layers)],
                grad_overlap=overlap)
    return stage_tail(p, Assignment({"g": "s"}), p.stages[0], compute)[0]


def test_gradient_reduction_hides_up_to_the_backward_but_its_last_chunk():
    assert _tail(1.0, 0.3, overlap=False) == pytest.approx(1.0)  # reduced after the backward: all exposed
    assert _tail(1.0, 0.3, overlap=True) == pytest.approx(1.0 - 0.2)  # backward (2/3 of 0.3) hides 0.2
    assert _tail(1.0, 30.0, overlap=True) == pytest.approx(0.25)  # long backward: the last layer's chunk stays


def test_deepep_beside_compute_takes_its_sms(graph, h800):
    """DeepEP's kernels hold 20 of 132 SMs while they overlap compute: each hidden second costs 20/112 s."""
    g = graph("internal-352b", n_layers=2)
    mc = MeshConfig(8, 1, 1, 1, 4)
    exposed = {}
    for dispatch in ("all_to_all", "deepep"):
        cm = CostModel(g, h800, Options(seq=8192, overlap=Overlap(chunks=0, a2a=True), ep_dispatch=dispatch))
        ch = cm.problem(mc).groups[MOE].choices["ep"]
        total = sum(ch.colls[n]["bf16"] for n in ("dispatch", "combine"))  # one node: the same bytes either way
        exposed[dispatch] = sum(ch.floors[n]["bf16"] for n in ("dispatch", "combine"))
    hidden = total - exposed["all_to_all"]
    assert hidden > 0
    assert exposed["deepep"] == pytest.approx(exposed["all_to_all"] + hidden * 20 / 112)


def test_a_compressed_collective_unchunks_the_whole_op(graph, h800):
    """meshplan's runtime chunks an sp/ep op only if none of its collectives is compressed (codegen.emit): with
    qkv_a2a in fp32 and out_a2a in bf16 both are exposed, with both fp32 both hide."""
    from meshplan.planner.problem import evaluate
    g = graph("internal-352b", n_layers=2)
    cm = CostModel(g, h800, Options(seq=8192))
    mc = MeshConfig(8, 1, 1, 1, 4)
    p = cm.problem(mc)
    att = "layers.*.attention"
    ch = p.groups[att].choices["sp"]
    assert set(ch.together) == {"qkv_a2a", "out_a2a"}
    strategy = {gr: ("sp" if gr == att else next(iter(grp.choices))) for gr, grp in p.groups.items()}

    def exposed(out_dt):
        a = Assignment(strategy, {(att, "qkv_a2a"): "fp32", (att, "out_a2a"): out_dt})
        return evaluate(p, a).groups[0][att].exposed / p.stages[0].groups[att]  # per instance (no input edge)

    both = ch.floors["qkv_a2a"]["fp32"] + ch.floors["out_a2a"]["fp32"]
    mixed = ch.colls["qkv_a2a"]["fp32"] + ch.colls["out_a2a"]["bf16"]
    assert exposed("fp32") == pytest.approx(both) and exposed("bf16") == pytest.approx(mixed)
    assert both < mixed

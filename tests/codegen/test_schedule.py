"""The overlap schedule: task-graph structure and bytes, scheduler properties over random plans, the validator."""
import random
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshplan.codegen.durations import ROOFLINES, Fixed, PlannerDurations, Roofline, durations_for, wire_bytes
from meshplan.codegen.schedule import Schedule, ScheduleError, Slot
from meshplan.codegen.scheduler import (
    critical_path,
    earliest_start_schedule,
    insertion_schedule,
    list_schedule,
    sequential_schedule,
)
from meshplan.codegen.task_graph import BWD, FWD, Task, TaskGraphError, build_task_graph
from meshplan.ir import Mesh, Plan, PlanError, trace
from meshplan.ir.strategies import STRATEGIES
from meshplan.models import build_model, load_config

GRAPH = trace(build_model(load_config("tiny")))  # dim 64, 4 heads / 2 KV heads, 4 experts, top-2
B, S = 8, 128
EPS = 1e-9


def plan(mesh=None, **strategies):
    return Plan.build(GRAPH, mesh or Mesh.of(dp=2, mp=2), strategies or {"attention": "sp", "moe": "ep"})


def ids(tg, direction, op, phases, chunk=None):
    return [f"{direction}:{op}/{p}" + (f"#{chunk}" if chunk is not None else "") for p in phases]


# ---- task graph ---------------------------------------------------------------------------------------------------
def test_ep_moe_is_a_chain_of_compute_and_all_to_alls_with_the_reference_volume():
    tg = build_task_graph(GRAPH, plan(), B, S)
    moe = "layers.0.feed_forward"
    chain = ids(tg, FWD, moe, ["route", "dispatch", "experts", "combine", "unpermute"])
    for prev, nxt in zip(chain, chain[1:]):
        assert tg[nxt].deps == (prev,)
    assert [tg[t].stream for t in chain] == ["compute", "comm", "compute", "comm", "compute"]
    a2a = [tg[t] for t in chain if tg[t].stream == "comm"]
    assert all(t.collective == "all_to_all" and t.group == 2 and t.axes == ("mp",) for t in a2a)
    # docs/reference.md: V_EP = 2·(k/n)·b·s·h·(n-1)/n per rank; b = 4 sequences per data-parallel replica, fp32
    b, k, n, h = B // 2, 2, 2, 64
    assert sum(wire_bytes(t.collective, t.nbytes, t.group) for t in a2a) == 2 * (k / n) * b * S * h * (n - 1) / n * 4
    # backward mirrors: the same all-to-alls in reverse order
    back = ids(tg, BWD, moe, ["unpermute", "combine", "experts", "dispatch", "route"])
    for prev, nxt in zip(back, back[1:]):
        assert prev in tg[nxt].deps
    assert tg[f"bwd:{moe}/dispatch"].collective == "all_to_all"


def test_ulysses_attention_volume_is_half_of_eq2():
    tg = build_task_graph(GRAPH, plan(), B, S)
    att = "layers.1.attention"
    chain = ids(tg, FWD, att, ["qkv", "qkv_a2a", "core", "out_a2a", "out_proj"])
    for prev, nxt in zip(chain, chain[1:]):
        assert tg[nxt].deps == (prev,)
    sent = sum(wire_bytes(tg[t].collective, tg[t].nbytes, tg[t].group) for t in chain if tg[t].stream == "comm")
    b, h, n, m = B // 2, 64, 2, 2
    eq2 = 2 * b * S * h * (n - 1) / n * (2 + 2 / m) / n  # elements; what one rank sends is half (docs/reference.md)
    assert sent == eq2 / 2 * 4


def test_tp_attention_all_gather_before_reduce_scatter_after_and_mirrored():
    tg = build_task_graph(GRAPH, plan(attention="tp", moe="ep"), B, S)
    ag, comp, rs = "fwd:layers.0.attention/in0", "fwd:layers.0.attention/compute", "fwd:layers.0.add/in1"
    assert tg[ag].collective == "all_gather" and tg[rs].collective == "reduce_scatter"
    assert tg[comp].deps == (ag,) and tg[rs].deps == (comp,)
    assert tg["bwd:layers.0.attention/in0"].collective == "reduce_scatter"
    assert tg["bwd:layers.0.add/in1"].collective == "all_gather"
    b, h, n = B // 2, 64, 2  # V_TP = 2·b·s·h·(n-1)/n
    assert sum(wire_bytes(tg[t].collective, tg[t].nbytes, tg[t].group) for t in (ag, rs)) == 2 * b * S * h * (
        n - 1) / n * 4


def test_gradient_reductions_wait_for_the_whole_backward_of_their_op():
    tg = build_task_graph(GRAPH, plan(), B, S, chunks=2)
    att = tg["bwd:layers.0.attention/grad"]  # SP replicates attention weights: reduce over dp and mp
    assert att.axes == ("dp", "mp") and att.group == 4 and att.nbytes == 12288 * 4
    bwd_compute = {t.id for t in tg if t.op == "layers.0.attention" and t.direction == BWD and t.stream == "compute"}
    assert set(att.deps) == bwd_compute and len(bwd_compute) == 6
    experts, router = tg["bwd:layers.0.feed_forward/grad"], tg["bwd:layers.0.feed_forward/grad_whole"]
    assert experts.axes == ("dp",) and experts.nbytes == 4 * 3 * 64 * 128 // 2 * 4  # half the experts per rank
    assert router.axes == ("dp", "mp") and router.nbytes == 64 * 4 * 4


def test_chunks_follow_chunkwise_ops_and_join_elsewhere():
    tg = build_task_graph(GRAPH, plan(), B, S, chunks=2, chunk_kinds={"moe"})
    moe = "layers.0.feed_forward"
    assert tg[f"fwd:{moe}/experts#1"].deps == (f"fwd:{moe}/dispatch#1",)
    assert tg[f"fwd:{moe}/route#0"].deps == ("fwd:layers.0.ffn_norm/compute",)  # whole norm feeds both chunks
    assert set(tg["fwd:layers.0.add_1/compute"].deps) == {"fwd:layers.0.add/compute", f"fwd:{moe}/unpermute#0",
                                                          f"fwd:{moe}/unpermute#1"}
    assert tg[f"fwd:{moe}/dispatch#0"].share == 0.5
    full = build_task_graph(GRAPH, plan(), B, S, chunks=2)
    # the loss is a mean over the batch: the backward starts after every chunk's forward
    assert set(full["bwd:output/compute#0"].deps) == {"fwd:output/compute#0", "fwd:output/compute#1"}


def test_chunk_count_must_divide_the_per_rank_batch():
    with pytest.raises(TaskGraphError, match=r"chunks: 3 chunks do not divide the per-rank batch 4"):
        build_task_graph(GRAPH, plan(), B, S, chunks=3)


def test_every_backward_task_follows_its_forward():
    tg = build_task_graph(GRAPH, plan(attention="tp"), B, S, chunks=2)
    sch = list_schedule(tg, ROOFLINES["cpu-gloo"]).validate(set(tg.tasks))
    for s in sch.slots:
        fwd = s.id.replace("bwd:", "fwd:", 1)
        if s.task.direction == BWD and fwd in tg.tasks:
            assert s.start >= sch[fwd].end


# ---- scheduler properties over random plans -------------------------------------------------------------------------
MESHES = [Mesh.of(mp=2), Mesh.of(dp=2, mp=2), Mesh.of(mp=4)]
KINDS = sorted({op.kind for op in GRAPH.ops() if op.kind in STRATEGIES})


def random_durations(seed: int, comm_scale: float) -> Fixed:
    """A random time per (direction, op, phase), times the task's share of the batch: chunks sum to the whole."""
    def fn(task: Task) -> float:
        key = f"{seed}:{task.direction}:{task.op}:{task.phase}".encode()
        base = random.Random(zlib.crc32(key)).uniform(0.1, 1.0)
        return base * task.share * (comm_scale if task.stream == "comm" else 1.0)
    return Fixed(fn, "random")


@st.composite
def random_case(draw):
    mesh = draw(st.sampled_from(MESHES))
    strategies = {k: draw(st.sampled_from(sorted(STRATEGIES[k]))) for k in KINDS}
    chunks = draw(st.integers(1, 4))
    kinds = draw(st.one_of(st.none(), st.sets(st.sampled_from(KINDS), min_size=1)))
    return mesh, strategies, chunks, kinds, draw(st.integers(0, 2**16)), draw(st.floats(0.05, 5.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case())
def test_random_plans_schedule_validly_and_within_bounds(case):
    mesh, strategies, chunks, kinds, seed, comm_scale = case
    try:
        p = Plan.build(GRAPH, mesh, strategies).validate(GRAPH)
    except PlanError:
        return  # e.g. generic ops that cannot be sequence-sharded: not a plan to schedule
    batch = mesh.size * chunks  # every rank's batch splits into `chunks`
    durations = random_durations(seed, comm_scale)
    tg = build_task_graph(GRAPH, p, batch, 32, chunks, kinds)
    sequential = sequential_schedule(build_task_graph(GRAPH, p, batch, 32, 1), durations).validate()
    lower = critical_path(tg, durations)
    for schedule in (earliest_start_schedule, insertion_schedule, list_schedule):
        sch = schedule(tg, durations).validate(set(tg.tasks))
        assert sch.makespan >= lower * (1 - EPS)
        for stream in ("compute", "comm"):
            assert sch.makespan >= sch.busy(stream) * (1 - EPS)
        assert sch.makespan <= sequential.makespan * (1 + EPS)  # overlap never loses to running tasks one by one
        assert 0 <= sch.exposed_comm <= sch.busy("comm") * (1 + EPS)


def test_chunks_hide_communication_when_comm_is_comparable_to_compute():
    p = plan(Mesh.of(mp=2), attention="sp", moe="ep")
    same = Fixed(lambda t: 1.0 * t.share, "1 per phase")  # every collective as long as every computation
    one = build_task_graph(GRAPH, p, B, S, 1)
    two = build_task_graph(GRAPH, p, B, S, 2)
    seq = sequential_schedule(one, same)
    c1, c2 = list_schedule(one, same).validate(), list_schedule(two, same).validate()
    assert c2.exposed_comm < c1.exposed_comm < seq.exposed_comm
    assert c2.makespan < c1.makespan < seq.makespan


def test_emitter_view_stream_order_and_cross_stream_waits():
    tg = build_task_graph(GRAPH, plan(), B, S, chunks=2)
    sch = list_schedule(tg, ROOFLINES["cpu-gloo"])
    experts = sch["fwd:layers.0.feed_forward/experts#0"]
    assert sch.waits(experts) == ["fwd:layers.0.feed_forward/dispatch#0"]
    comm = sch.in_stream_order("comm")
    assert all(a.end <= b.start + EPS for a, b in zip(comm, comm[1:]))
    program = sch.program()
    assert [s for s, _ in program["comm"]] == comm
    assert sum(len(v) for v in program.values()) == len(tg)
    assert dict((s.id, w) for s, w in program["compute"])[experts.id] == sch.waits(experts)


def test_round_trip_dict_and_yaml():
    tg = build_task_graph(GRAPH, plan(), B, S, chunks=2)
    sch = list_schedule(tg, ROOFLINES["h800"])
    again = Schedule.from_dict(sch.to_dict())
    assert again.slots == sch.slots and again.meta == sch.meta
    again = Schedule.from_yaml(sch.to_yaml())
    assert again.slots == sch.slots and again.meta == sch.meta
    assert again.validate(set(tg.tasks)).makespan == sch.makespan


# ---- durations -------------------------------------------------------------------------------------------------
def test_planner_cost_model_prices_collectives_with_its_own_model():
    cc = pytest.importorskip("meshplan.planner.collectives_cost")
    from meshplan.planner.cluster import load_cluster

    d = durations_for("h800", Mesh.of(dp=2, mp=8))  # configs/clusters/h800.yaml: 8 GPUs per node
    assert isinstance(d, PlannerDurations)
    assert d.local(("mp",), 8) == 8 and d.local(("dp",), 2) == 1 and d.local(("dp", "mp"), 16) == 8
    t = Task("x", "op", "moe", "dispatch", FWD, None, "comm", (), collective="all_to_all", nbytes=1e6, axes=("dp",),
             group=2)
    assert d(t) == cc.comm_time("all_to_all", cc.traffic("all_to_all", 1e6, 2, 1), load_cluster("h800"))


def test_chunked_gemms_pay_the_planners_size_efficiency():
    """On a cluster without a kernel model (CPU, fitted by calibrate) a chunk's GEMM has 1/c of the rows: the
    planner's size efficiency x/(x + c0) makes c chunks cost more compute than the whole op, where a plain
    roofline would price them the same."""
    from meshplan.planner.cluster import load_cluster
    from meshplan.planner.cost_model import size_efficiency

    cluster = load_cluster("local")
    assert cluster.kernels is None
    d = durations_for("local", Mesh.of(dp=2, mp=2))
    moe = "layers.0.feed_forward"
    whole = build_task_graph(GRAPH, plan(), B, S, chunks=1)[f"fwd:{moe}/experts"]
    # EP on mp=2 with dp=2: a rank routes B·S/4 tokens, k=2 copies each, over 4 experts, 2 ranks per group
    rows = 2 * (B * S / 4) * 2 / 4
    assert whole.gemm_dims == (rows, 64, 128)  # tiny: dim 64, expert hidden 128
    eff = float(size_efficiency(whole.gemm_dims, cluster.gemm_half_size))
    assert d(whole) == pytest.approx(max(whole.flops / (cluster.achievable_flops * eff),
                                         whole.mem_bytes / cluster.hbm_bandwidth), rel=1e-12)
    tg4 = build_task_graph(GRAPH, plan(), B, S, chunks=4, chunk_kinds={"moe"})
    parts = [tg4[f"fwd:{moe}/experts#{c}"] for c in range(4)]
    assert all(p.gemm_dims == (rows / 4, 64, 128) for p in parts)
    assert sum(p.flops for p in parts) == pytest.approx(whole.flops)
    c0 = cluster.gemm_half_size  # the GEMM term of a chunk: 1/4 of the FLOPs at x/(x + c0) of its 4x shorter rows
    eff4 = float(size_efficiency(parts[0].gemm_dims, c0))
    assert eff / eff4 == pytest.approx((rows / (rows + c0)) / (rows / 4 / (rows / 4 + c0)))
    assert sum(d(p) for p in parts) > 1.1 * d(whole)  # a roofline without the size term: exactly 1.0x


def test_gpu_tasks_are_priced_by_the_planners_kernel_model():
    """On a GPU cluster a task's compute is the planner's kernel model (planner/kernels.py): its GEMMs run in waves
    of 128x256 output tiles on 132 SMs. The tiny model's expert GEMMs (2 local experts x 3 GEMMs of 256 x 64 x 128)
    fill one wave; a quarter of the rows still takes one wave, so 4 chunks pay 4 waves for the same FLOPs."""
    from meshplan.planner.cluster import load_cluster

    cluster = load_cluster("h800")
    kern = cluster.kernels
    d = durations_for("h800", Mesh.of(dp=2, mp=2))
    moe = "layers.0.feed_forward"
    whole = build_task_graph(GRAPH, plan(), B, S, chunks=1)[f"fwd:{moe}/experts"]
    assert whole.gemm_dims == (256, 64, 128) and whole.flops == pytest.approx(6 * 2 * 256 * 64 * 128)
    wave = 2 * kern.tile[0] * kern.tile[1] * 64 / (cluster.peak_flops * kern.gemm_efficiency / kern.sm_count)
    memory = whole.mem_bytes / (cluster.hbm_bandwidth * kern.memory_efficiency)
    assert d(whole) == pytest.approx(wave + memory + kern.launch_s, rel=1e-12)
    tg4 = build_task_graph(GRAPH, plan(), B, S, chunks=4, chunk_kinds={"moe"})
    parts = [tg4[f"fwd:{moe}/experts#{c}"] for c in range(4)]
    gemm_terms = [d(p) - p.mem_bytes / (cluster.hbm_bandwidth * kern.memory_efficiency) - kern.launch_s
                  for p in parts]
    assert sum(gemm_terms) == pytest.approx(4 * wave, rel=1e-9)
    bwd = build_task_graph(GRAPH, plan(), B, S, chunks=1)[f"bwd:{moe}/experts"]
    # backward: input gradient (256 x 128 x 64: one wave) and weight gradient (64 x 256 x 128 per GEMM, 6 GEMMs of
    # one tile each: one wave) at the weight gradient's inner dim 256
    wgrad_wave = wave * 256 / 64
    wave_dgrad = 2 * kern.tile[0] * kern.tile[1] * 128 / (cluster.peak_flops * kern.gemm_efficiency / kern.sm_count)
    assert d(bwd) == pytest.approx(wave_dgrad + wgrad_wave + bwd.mem_bytes / (cluster.hbm_bandwidth
                                                                            * kern.memory_efficiency)
                                   + 2 * kern.launch_s, rel=1e-12)


def test_roofline_presets_and_unknown_clusters():
    assert isinstance(durations_for("cpu-gloo"), Roofline)
    with pytest.raises(ValueError, match=r"cluster 'nope'.*presets: h800, cpu-gloo"):
        durations_for("nope")
    r = Roofline("r", peak_flops=1e12, mem_bw=1e11, link_bw=1e9, latency=1e-5, launch=0.0)
    gemm = Task("g", "op", "moe", "experts", FWD, None, "compute", (), flops=1e12, mem_bytes=1e9)
    a2a = Task("a", "op", "moe", "dispatch", FWD, None, "comm", (), collective="all_to_all", nbytes=4e9, group=2)
    assert r(gemm) == 1.0  # compute-bound: 1e12 FLOPs at 1e12 FLOP/s
    assert r(a2a) == pytest.approx(1e-5 + 4e9 / 2 * 0.5 / 1e9)


# ---- validator --------------------------------------------------------------------------------------------------
def task(tid, stream="compute", deps=()):
    return Task(tid, "op", "generic", "compute", FWD, None, stream, tuple(deps))


def test_validator_rejects_a_violated_dependency():
    sch = Schedule([Slot(task("a"), 0, 2e-6), Slot(task("b", "comm", ["a"]), 1e-6, 3e-6)])
    with pytest.raises(ScheduleError, match=r"task 'b' starts at 1.000 us, before its dependency 'a' ends"):
        sch.validate()


def test_validator_rejects_a_duplicated_task():
    sch = Schedule([Slot(task("a"), 0, 1), Slot(task("a"), 1, 2)])
    with pytest.raises(ScheduleError, match=r"task 'a' is scheduled twice"):
        sch.validate()


def test_validator_rejects_overlap_on_one_stream():
    sch = Schedule([Slot(task("a", "comm"), 0, 2), Slot(task("b", "comm"), 1, 3), Slot(task("c"), 1, 3)])
    with pytest.raises(ScheduleError, match=r"tasks 'a' and 'b' overlap on stream comm"):
        sch.validate()


def test_validator_rejects_missing_tasks():
    with pytest.raises(ScheduleError, match=r"task 'b' is missing from the schedule"):
        Schedule([Slot(task("a"), 0, 1)]).validate(expected={"a", "b"})
    with pytest.raises(ScheduleError, match=r"task 'a' depends on 'z', which is missing"):
        Schedule([Slot(task("a", deps=["z"]), 0, 1)]).validate()


def test_validator_rejects_a_real_schedule_broken_by_hand():
    tg = build_task_graph(GRAPH, plan(), B, S, chunks=2)
    sch = list_schedule(tg, ROOFLINES["cpu-gloo"]).validate(set(tg.tasks))
    victim = "fwd:layers.0.feed_forward/experts#0"
    broken = [Slot(s.task, 0.0, s.duration) if s.id == victim else s for s in sch.slots]
    with pytest.raises(ScheduleError, match=victim):
        Schedule(broken).validate()
    with pytest.raises(ScheduleError, match="is missing from the schedule"):
        Schedule([s for s in sch.slots if s.id != victim]).validate(set(tg.tasks))

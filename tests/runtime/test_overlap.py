"""The emitted overlap program computes what one device computes: loss and every gradient, with overlap on.

In-process worlds for the matrix (SP/TP attention x EP/TP MoE, worlds of 2 and 4, 1/2/4 chunks) and one spawned
world of real gloo processes. The emitted module replaces the executor's implementation of the SP attention and
EP MoE ops (TP ops have no collective inside them and stay the executor's), so the same checks also show that
the overlap run moves exactly the bytes the sequential run does.
"""
import json
from pathlib import Path

import pytest
import torch
from rt_harness import (
    MESHES,
    batch_for,
    make_model,
    mismatches,
    rank_step,
    reference,
    tiny_config,
    uniform_plan,
)

from meshplan.codegen.emit import emit_module
from meshplan.ir import Mesh, Plan, trace
from meshplan.models import ModelConfig
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.async_collectives import start_exchange
from meshplan.runtime.collectives import Channel, exchange
from meshplan.runtime.launch import spawn
from meshplan.runtime.overlap import enable_overlap, load_emitted

SEQ = 8


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(n_shared_experts=1, n_dense_layers=1, n_layers=3)
    return cfg, trace(make_model(cfg))


def run_overlap(cfg, graph, plan, batch, chunks, emit_dir, overlap=True):
    tokens, targets = batch_for(cfg, batch, SEQ)
    world = LocalWorld(plan.mesh.size, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        if overlap:
            enable_overlap(pm, batch, SEQ, chunks, "cpu-gloo", directory=emit_dir)
        loss, grads = rank_step(pm, tokens, targets)
        return loss, grads, sorted(pm.op_overrides), pm.comm_stats.total()

    return world.run(rank)


MATRIX = [(a, m, mesh, c) for mesh in ("2", "4") for a in ("sp", "tp") for m in ("ep", "tp") for c in (1, 2, 4)]


@pytest.mark.parametrize("attention,moe,mesh_name,chunks", MATRIX)
def test_overlap_equals_one_device(tiny, tmp_path, attention, moe, mesh_name, chunks):
    cfg, graph = tiny
    plan = uniform_plan(graph, MESHES[mesh_name], {"attention": attention, "moe": moe, "ffn": "tp"})
    batch = 4
    tokens, targets = batch_for(cfg, batch, SEQ)
    ref_loss, ref_grads = reference(cfg, "lm", tokens, targets)
    results = run_overlap(cfg, graph, plan, batch, chunks, tmp_path)
    expected = {f"layers.{i}.attention" for i in range(3)} if attention == "sp" else set()
    expected |= {f"layers.{i}.feed_forward" for i in (1, 2)} if moe == "ep" else set()
    for r, (loss, grads, overrides, _) in enumerate(results):
        assert set(overrides) == expected, f"rank {r}: the emitted code was not installed for {expected}"
        assert mismatches(loss, grads, ref_loss, ref_grads) == [], f"rank {r}"


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_overlap_with_data_parallel_and_capacity(tmp_path, capacity_factor):
    """dp x mp (each rank's batch is half the global one), and a capacity factor (decided on the whole batch)."""
    cfg = tiny_config(capacity_factor=capacity_factor)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2,mp2"], {"attention": "sp", "moe": "ep"})
    tokens, targets = batch_for(cfg, 8, SEQ)
    ref_loss, ref_grads = reference(cfg, "lm", tokens, targets)
    for r, (loss, grads, overrides, _) in enumerate(run_overlap(cfg, graph, plan, 8, 2, tmp_path)):
        assert overrides and mismatches(loss, grads, ref_loss, ref_grads) == [], f"rank {r}"


def test_overlap_moves_the_same_bytes(tiny, tmp_path):
    cfg, graph = tiny
    plan = uniform_plan(graph, MESHES["4"], {"attention": "sp", "moe": "ep"})
    on = run_overlap(cfg, graph, plan, 4, 2, tmp_path)
    off = run_overlap(cfg, graph, plan, 4, 2, tmp_path, overlap=False)
    # the per-chunk row counts exchange is the one extra collective: a few int64s per chunk
    for (_, _, _, b_on), (_, _, _, b_off) in zip(on, off):
        assert b_off <= b_on <= b_off + 2 * 2 * 4 * 8 * 3


def test_emitted_module_is_cached_and_readable(tiny, tmp_path):
    cfg, graph = tiny
    plan = uniform_plan(graph, MESHES["2"], {"attention": "sp", "moe": "ep"})
    source = emit_module(graph, plan, 4, SEQ, 2, "cpu-gloo")
    first, again = load_emitted(source, tmp_path), load_emitted(source, tmp_path)
    assert first is again and Path(first.__file__).read_text() == source
    assert set(first.OPS) >= {"layers.0.attention", "layers.1.feed_forward"}


def test_pending_waits_once():
    """A started all-to-all (a real in-flight AsyncCollectiveTensor) is waited for once; its result is kept and
    equals the synchronous exchange's."""
    mesh = Mesh((("tp", 2),))
    world = LocalWorld(2, timeout_s=30)
    groups = world.groups(mesh)

    def body(rank):
        ch = Channel(groups[rank].axis("tp"))
        x = torch.arange(8.0).view(4, 2) + 100 * rank
        p = start_exchange(x, 0, 1, ch)
        assert not p.done
        first = p.wait()
        assert p.done and first is p.wait()
        return first, exchange(x, 0, 1, ch)

    for got, want in world.run(body):
        assert torch.equal(got, want)
    assert torch.equal(want, torch.tensor([[4.0, 5.0, 104.0, 105.0], [6.0, 7.0, 106.0, 107.0]]))


# ---- one real multi-process world ------------------------------------------------------------------------
def overlap_worker(rank: int, world: int, config: dict, plan_yaml: str, batch: int, chunks: int, out: str) -> None:
    torch.set_num_threads(1)
    cfg = ModelConfig(**config)
    tokens, targets = batch_for(cfg, batch, SEQ)
    ref_loss, ref_grads = reference(cfg, "lm", tokens, targets)
    graph = trace(make_model(cfg))
    pm = ParallelModel(make_model(cfg), Plan.from_yaml(plan_yaml), graph=graph, timeout_s=60)
    module = enable_overlap(pm, batch, SEQ, chunks, "cpu-gloo", directory=Path(out, "emitted"))
    loss, grads = rank_step(pm, tokens, targets)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"bad": mismatches(loss, grads, ref_loss, ref_grads),
                                                         "ops": sorted(module.OPS)}))


def test_real_processes_world_of_2(tmp_path):
    cfg = tiny_config(n_shared_experts=1)
    plan = uniform_plan(trace(make_model(cfg)), Mesh.of(mp=2), {"attention": "sp", "moe": "ep"})
    spawn(2, overlap_worker, cfg.to_dict(), plan.to_yaml(), 4, 2, str(tmp_path), timeout_s=60)
    for r in range(2):
        rep = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert rep["bad"] == [] and "layers.0.attention" in rep["ops"], f"rank {r}: {rep}"


def max_in_flight(trace: list) -> dict[int, int]:
    """Per rank (thread), the most backward all-to-alls issued and not yet waited for at one time."""
    live: dict[int, set] = {}
    most: dict[int, int] = {}
    for event, thread, mirror in trace:
        s = live.setdefault(thread, set())
        if event == "issue":
            s.add(mirror)
        else:
            assert mirror in s, "a backward all-to-all was waited for before it was issued"
            s.discard(mirror)
        most[thread] = max(most.get(thread, 0), len(s))
    assert all(not s for s in live.values()), "a backward all-to-all was issued and never waited for"
    return most


@pytest.mark.parametrize("chunks", [1, 2])
def test_backward_overlaps_across_chunks(tiny, tmp_path, monkeypatch, chunks):
    """The mirror all-to-alls of the backward are issued where their gradient appears and waited for only where
    autograd needs them: with one chunk each is waited for before the next is issued (nothing to overlap with); with
    two, autograd runs the other chunk's backward in between, so two are in flight at once on every rank. Bytes and
    gradients are checked by the tests above."""
    import meshplan.runtime.async_collectives as ac

    cfg, graph = tiny
    plan = uniform_plan(graph, MESHES["2"], {"attention": "sp", "moe": "ep", "ffn": "tp"})
    trace_events: list = []
    monkeypatch.setattr(ac, "TRACE", trace_events)
    run_overlap(cfg, graph, plan, 4, chunks, tmp_path)
    # 3 SP attention layers x 2 all-to-alls + 2 EP MoE layers x 2, per chunk, issued and waited once on each rank
    assert len(trace_events) == 2 * 2 * (3 * 2 + 2 * 2) * chunks
    assert set(max_in_flight(trace_events).values()) == ({1} if chunks == 1 else {2})

"""Gradient reduction overlapped with the backward (runtime/grad_overlap.py) against the post-backward reduction.

Same buckets, same collectives, same summation order: the gradients (and ZeRO's reduced slices) are bit-identical,
fp32 and bf16 wire, tp and ep plans on dp2 x mp2, a tied model, full recompute. And the overlap is real: a
bucket's collective is issued from the backward, before the gradients of the first layers have accumulated.
"""
import pytest
import torch
from rt_harness import MESHES, batch_for, loss_of, make_model, tiny_config, uniform_plan

from meshplan.ir import trace
from meshplan.runtime import LocalWorld, ParallelModel, ZeroAdamW
from meshplan.runtime.device_mesh import local_tensor

TP = {"attention": "tp", "moe": "ag_scatter", "embedding": "vocab"}
EP = {"attention": "sp", "moe": "ep"}


def _grads(cfg, plan, graph, overlap: bool, zero: bool, steps):
    """Per rank: the reduced local gradients after each step ({name: tensor}, or ZeRO's reduced slices)."""
    world = LocalWorld(4, timeout_s=60)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r], overlap_grad_reduce=overlap)
        opt = ZeroAdamW(pm, lr=1e-2) if zero else torch.optim.AdamW(pm.parameters(), lr=1e-2)
        out = []
        for tokens, targets in steps:
            opt.zero_grad()
            loss_of(pm(tokens), targets).backward()
            if zero:
                opt.reduce_gradients()
                out.append([p.grad.clone() for p in (b.shard for b in opt.buckets)])
            else:
                pm.reduce_gradients()
                out.append({n: local_tensor(p.grad).clone() for n, p in pm.named_parameters() if p.grad is not None})
            opt.step()  # the second step starts from updated weights, so hooks re-arm across steps
        return out, dict(pm.comm_stats.bytes)

    return world.run(rank)


def _same(a, b) -> list[str]:
    bad = []
    for r, (ra, rb) in enumerate(zip(a, b)):
        for s, (sa, sb) in enumerate(zip(ra[0], rb[0])):
            keys = sa.keys() if isinstance(sa, dict) else range(len(sa))
            assert len(sa) == len(sb) and len(sa) > 0
            bad += [f"rank {r} step {s} {k}" for k in keys if not torch.equal(sa[k], sb[k])]
        if ra[1] != rb[1]:
            bad.append(f"rank {r}: comm bytes differ")
    return bad


@pytest.mark.parametrize("strategies,precision,zero,tied,recompute", [
    (TP, "fp32", False, True, "none"),
    (EP, "fp32", True, False, "none"),
    (EP, "bf16", False, False, "full"),
    (TP, "bf16", True, True, "full"),
])
def test_overlapped_equals_post_backward_bitwise(strategies, precision, zero, tied, recompute):
    """Mutation tried: issuing a bucket at its first gradient instead of its last, with the re-accumulation
    guard off (the other gradients are still partial: every case differs; with the guard on, it raises)."""
    cfg = tiny_config(n_shared_experts=1, tie_embeddings=tied)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2,mp2"], strategies, precision={"grad": precision})
    plan.meta = {**(plan.meta or {}), "activation_recompute": recompute}
    steps = [batch_for(cfg, 4, 8, seed=s) for s in range(2)]
    post = _grads(cfg, plan, graph, False, zero, steps)
    over = _grads(cfg, plan, graph, True, zero, steps)
    assert _same(post, over) == []


def test_first_bucket_is_issued_during_backward():
    """The first bucket (the last layers' gradients) is issued before the embedding's gradient accumulates
    (the embedding is the first op, so its gradient is the backward's last). Fails if the issue moves to
    reduce_gradients(). Also: a bucket issued twice in one step is refused, and no_grad_sync() defers."""
    cfg = tiny_config(n_shared_experts=1, n_layers=3)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2"], {"attention": "tp", "moe": "ag_scatter"})
    tokens, targets = batch_for(cfg, 4, 8)
    world = LocalWorld(2, timeout_s=60)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r], overlap_grad_reduce=True,
                           bucket_mb=0.002)
        trace_ = pm.grad_launcher.trace = []
        with pm.no_grad_sync():  # an earlier micro-batch: nothing issued
            loss_of(pm(tokens), targets).backward()
        deferred = [e for e in trace_ if e[0] == "issue"]
        loss_of(pm(tokens), targets).backward()
        pm.reduce_gradients()
        try:
            loss_of(pm(tokens), targets).backward()
            loss_of(pm(tokens), targets).backward()  # accumulates into buckets already issued
            refused = False
        except RuntimeError as e:
            refused = "accumulated again" in str(e)
            pm.reduce_gradients()  # waits for what the refused backward had issued
        return deferred, trace_, len(pm._reducer.buckets), refused

    for deferred, events, n_buckets, refused in world.run(rank):
        assert deferred == [] and refused
        assert n_buckets >= 3
        embed = [i for i, e in enumerate(events) if e[0] == "grad" and "embed" in e[1]]
        issued = [i for i, e in enumerate(events) if e[0] == "issue"]
        waited = [i for i, e in enumerate(events) if e[0] == "wait"]
        assert embed and issued and waited
        assert any(issued[0] < i < waited[0] for i in embed)  # the armed backward's embedding gradient
        assert [events[i][1] for i in issued[:n_buckets]] == list(range(n_buckets))  # in bucket order


"""Cross-entropy on local shards (runtime/loss_parallel.py): equal to one device, with fewer bytes than gathering."""
import pytest
import torch
import torch.nn.functional as F
from rt_harness import MESHES, batch_for, make_model, reference, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.ir.placement import Partial, Replicate, Shard
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.collectives import local_chunk
from meshplan.runtime.loss_parallel import align_targets, cross_entropy

PLANS = [("dp2,mp2", {"attention": "sp", "moe": "ep"}), ("dp2,mp2", {"attention": "sp", "moe": "ep",
                                                                     "lm_head": "replicate"}),
         ("4", {"attention": "tp", "moe": "tp"}), ("dp2", None)]


@pytest.mark.parametrize("mesh,strategies", PLANS, ids=[f"{m}-{s and '+'.join(s.values())}" for m, s in PLANS])
@pytest.mark.parametrize("local", [False, True], ids=["global-batch", "local-batch"])
def test_loss_on_shards_matches_one_device(mesh, strategies, local):
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES[mesh], strategies or {}, axis=None if strategies is None else "last")
    tokens, targets = batch_for(cfg, 4, 8)
    ref_loss, ref_grads = reference(cfg, "lm", tokens, targets)
    world = LocalWorld(plan.mesh.size, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        if local:  # this rank's shard of the batch, cut as the first op wants it: nothing is broadcast
            place = pm.input_placement()
            x, y = _shard(tokens, place, pm.axes), _shard(targets, place, pm.axes)
            loss = pm.loss(x, y, local=True)
        else:
            loss = pm.loss(tokens, targets)
        loss.backward()
        pm.reduce_gradients()
        return loss.item(), pm.full_grads(), pm.comm_stats.total(op="return")

    for loss, grads, gathered in world.run(rank):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert gathered == 0  # the logits were never assembled
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-6), (name, (grads[name] - g).abs().max())


def _shard(x, placement, axes):
    for g, p in zip(axes, placement):
        if isinstance(p, Shard):
            x = local_chunk(x, p.dim, g.size, g.index)
    return x


@pytest.mark.parametrize("vocab_on", ["mp", "both"])
def test_vocab_parallel_cross_entropy(vocab_on):
    """Logits split over the vocabulary (and the batch over dp, or the vocabulary over both axes): loss and
    gradient of every shard equal F.cross_entropy on the full logits."""
    mesh = Mesh.of(dp=2, mp=2)
    full = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(3)) * 4
    targets = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(4))
    ref = full.clone().requires_grad_()
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()
    placement = (Shard(0), Shard(2)) if vocab_on == "mp" else (Shard(2), Shard(2))
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(mesh)

    def rank(r):
        axes = groups[r].ordered()
        mine = _shard(full, placement, axes).clone().requires_grad_()
        y = align_targets(targets, (Replicate(), Replicate()), placement, axes)
        loss = cross_entropy(mine, placement, y, axes, targets.numel(), root=groups[r].is_root)
        loss.backward()
        return loss.item(), mine.grad, _shard(ref.grad, placement, axes)

    expected = F.cross_entropy(full.flatten(0, 1), targets.flatten()).item()
    for loss, grad, want in world.run(rank):
        assert loss == pytest.approx(expected, rel=1e-6)
        assert torch.allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_partial_logits_are_summed_first():
    """A row-parallel last op leaves summands: the loss is of their sum, and each summand gets its full gradient."""
    mesh = Mesh.of(mp=2)
    parts = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 8, (3, 5), generator=torch.Generator().manual_seed(6))
    ref = parts.sum(0).requires_grad_()
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()
    world = LocalWorld(2, timeout_s=30)
    groups = world.groups(mesh)

    def rank(r):
        mine = parts[r].clone().requires_grad_()
        loss = cross_entropy(mine, (Partial(),), targets, groups[r].ordered(), targets.numel(),
                             root=groups[r].is_root)
        loss.backward()
        return loss.item(), mine.grad

    for loss, grad in world.run(rank):
        assert loss == pytest.approx(F.cross_entropy(parts.sum(0).flatten(0, 1), targets.flatten()).item())
        assert torch.allclose(grad, ref.grad, rtol=1e-5, atol=1e-7)

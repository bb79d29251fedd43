"""ZeRO-1 (zero.ZeroAdamW) and global gradient-norm clipping (grad_clip.py) against one device.

N steps of AdamW with clipping under a dp x mp plan, the optimizer state sharded over each parameter's replica
group, give the single-device model's parameters (fp32 tolerance); the global gradient norm under tp, ep, sp,
vocab and dp x mp plans is torch.nn.utils.clip_grad_norm_'s on one device, and so are the clipped gradients.
"""
import math

import pytest
import torch
from rt_harness import MESHES, batch_for, loss_of, make_model, tiny_config, uniform_plan

from meshplan.ir import trace
from meshplan.runtime import LocalWorld, ParallelModel, ZeroAdamW, clip_grad_norm_, grad_pieces
from meshplan.runtime.zero import state_bytes

LR, MAX_NORM = 1e-2, 0.5  # the tiny model's gradient norm is ~1-3: every step clips


def _reference(cfg, steps, max_norm):
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for tokens, targets in steps:
        opt.zero_grad()
        loss = loss_of(model(tokens), targets)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
        losses.append(loss.item())
    return model, opt, losses, norms


@pytest.mark.parametrize("strategies", [{"attention": "sp", "moe": "ep"},
                                        {"attention": "tp", "moe": "ag_scatter", "embedding": "vocab"}])
def test_zero_adamw_with_clipping_matches_one_device(strategies):
    """Mutations tried: the shard offset taken outermost axis first (ranks step the wrong slice: parameters
    differ), clip counting replicated gradients on every rank (norm differs), step() without the all-gather."""
    cfg = tiny_config(n_shared_experts=1)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2,mp2"], strategies)
    steps = [batch_for(cfg, 4, 8, seed=s) for s in range(3)]
    ref, ref_opt, ref_losses, ref_norms = _reference(cfg, steps, MAX_NORM)
    assert min(ref_norms) > MAX_NORM  # clipping is exercised on every step
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        opt = ZeroAdamW(pm, lr=LR)
        losses, norms = [], []
        for tokens, targets in steps:
            opt.zero_grad()
            loss = loss_of(pm(tokens), targets)
            loss.backward()
            opt.reduce_gradients()
            norms.append(clip_grad_norm_(opt.grad_pieces(), MAX_NORM, pm.axes).item())
            opt.step()
            losses.append(loss.item())
        # what the planner prices: 8 B of AdamW moments per element over its replica group (+ padding, steps)
        priced = sum(8 * e.local.numel() / math.prod(g.size for g in e.axes) for e in pm.grad_entries())
        return losses, norms, pm.full_state_dict(), opt.state_bytes(), priced, opt

    expected = ref.state_dict()
    ref_bytes = state_bytes(ref_opt)
    for losses, norms, state, nbytes, priced, opt in world.run(rank):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        for k, v in expected.items():
            assert torch.allclose(state[k], v, rtol=1e-5, atol=2e-5), (k, (state[k] - v).abs().max().item())
        pad_and_steps = 8 * 4 * len(opt.buckets) + 4 * len(opt.optimizer.state)
        assert priced <= nbytes <= priced + pad_and_steps
        assert nbytes < ref_bytes / 2  # a dp x mp = 2 x 2 world: every parameter has 2 or 4 replicas


def _grads_and_norm(plan_mesh, strategies, cfg, tokens, targets, max_norm):
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES[plan_mesh], strategies)
    world = LocalWorld(plan.mesh.size, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        loss_of(pm(tokens), targets).backward()
        pm.reduce_gradients()
        norm = clip_grad_norm_(grad_pieces(pm), max_norm, pm.axes)
        return norm.item(), pm.full_grads()

    return world.run(rank)


@pytest.mark.parametrize("mesh, strategies", [
    ("2", {"attention": "tp", "moe": "tp", "ffn": "tp"}),
    ("2", {"attention": "sp", "moe": "ep"}),
    ("4", {"attention": "tp", "moe": "ep", "embedding": "vocab"}),
    ("dp2", {}),
    ("dp2,mp2", {"attention": "sp", "moe": "ag_scatter"}),
])
def test_global_grad_norm_is_torchs_on_one_device(mesh, strategies):
    """Mutation tried: summing every rank's squares without skipping replicated copies (norm too large by up to
    sqrt(world)), and skipping the all-reduce on the data-parallel axis (norm too small)."""
    cfg = tiny_config(n_shared_experts=1, n_dense_layers=1)
    tokens, targets = batch_for(cfg, 4, 8)
    ref = make_model(cfg)
    loss_of(ref(tokens), targets).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1).item()
    assert ref_norm > 0.1
    for norm, grads in _grads_and_norm(mesh, strategies, cfg, tokens, targets, 0.1):
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        for name, p in ref.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name


def test_pipeline_stages_with_zero_and_clipping_match_one_device():
    """pp=2 x dp=2 (gpipe): each stage's ZeroAdamW over its dp axis, the norm summed over the stages too.
    Mutation tried: leaving the pp axis out of the norm's axes (each stage sees only its own part: norms differ)."""
    from meshplan.ir import Mesh, Plan
    from meshplan.ir.pipeline import Pipeline
    from meshplan.models import build_model, load_config
    from meshplan.runtime.pipeline import PipelineRunner, full_mesh

    cfg = load_config("small")
    graph = trace(build_model(cfg, seed=0))
    plan = Plan.build(graph, Mesh.of(dp=2), {}, axis=None)
    plan.pipeline = Pipeline(2, None, microbatches=2, schedule="gpipe")
    steps = [batch_for(cfg, 4, 16, seed=s) for s in range(2)]
    ref = build_model(cfg, seed=0)
    # eps=1e-3: Adam's first steps move a parameter by +-lr whatever its gradient's size, so float32 noise in a
    # near-zero gradient (micro-batches summed in another order) would move it by lr; a large eps keeps the update
    # proportional to the gradient, and the comparison at float32 tolerance
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=1e-3)
    ref_norms = []
    for tokens, targets in steps:
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(tokens).flatten(0, 1), targets.flatten()).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item())
        ref_opt.step()
    world = LocalWorld(4, timeout_s=60)
    groups = world.groups(full_mesh(plan))

    def rank(r):
        runner = PipelineRunner(build_model(cfg, seed=0), plan, graph, groups=groups[r])
        opt = ZeroAdamW(runner.model, lr=LR, eps=1e-3)
        norms = []
        for tokens, targets in steps:
            opt.zero_grad()
            runner.step(tokens, targets)
            opt.reduce_gradients()
            norms.append(clip_grad_norm_(opt.grad_pieces(), MAX_NORM, [runner.pp, *runner.model.axes]).item())
            opt.step()
        pm = runner.model  # this stage's parameters, gathered over its dp axis
        return norms, {n: p.full_tensor() for n, p in pm.named_parameters()}

    expected, owned = dict(ref.named_parameters()), set()
    for norms, state in world.run(rank):
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        owned |= set(state)
        for k, v in state.items():
            assert torch.allclose(v, expected[k].detach(), rtol=1e-5, atol=1e-6), (k, (v - expected[k]).abs().max())
    assert owned == set(expected)

def test_zero_with_bf16_gradient_reduction():
    """plan precision grad=bf16: ZeRO's reduce-scatter sends bf16 (an all-to-all summed in float32), the parameter
    all-gather stays fp32. One AdamW step with eps=1 moves each parameter by -g / (|g| + 1), so the update shows the
    reduced gradient: equal to one device's within bf16 rounding. Bytes: the bf16 reduce-scatter is half the fp32
    one."""
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    tokens, targets = batch_for(cfg, 4, 8)
    ref = make_model(cfg)
    loss_of(ref(tokens), targets).backward()
    torch.optim.AdamW(ref.parameters(), lr=1.0, eps=1.0, weight_decay=0.0).step()
    expected = {n: p.detach() - make_model(cfg).state_dict()[n] for n, p in ref.named_parameters()}
    mesh = MESHES["dp2,mp2"]
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(mesh)

    def rank(r, precision):
        plan = uniform_plan(graph, mesh, {"attention": "sp", "moe": "ep"}, precision=precision)
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        before = pm.full_state_dict()
        opt = ZeroAdamW(pm, lr=1.0, eps=1.0, weight_decay=0.0)
        loss_of(pm(tokens), targets).backward()
        pm.comm_stats.reset()
        opt.reduce_gradients()
        sent = pm.comm_stats.total(kind="reduce_scatter") + pm.comm_stats.total(kind="all_to_all")
        opt.step()
        return {n: v - before[n] for n, v in pm.full_state_dict().items()}, sent

    fp32 = world.run(lambda r: rank(r, None))
    bf16 = world.run(lambda r: rank(r, {"grad": "bf16"}))
    for (delta32, sent32), (delta16, sent16) in zip(fp32, bf16):
        assert sent16 * 2 == pytest.approx(sent32, rel=0.02)
        for name, want in expected.items():
            torch.testing.assert_close(delta32[name], want, rtol=1e-4, atol=1e-6)
            scale = want.abs().max().item()
            assert (delta16[name] - want).abs().max().item() <= 1e-2 * scale + 1e-6, name


def test_one_zero_optimizer_per_model():
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    pm = ParallelModel(make_model(cfg), uniform_plan(graph, MESHES["1"], {}), graph=graph)
    ZeroAdamW(pm)
    with pytest.raises(ValueError, match="already has one"):
        ZeroAdamW(pm)

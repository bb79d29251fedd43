"""Training through the public API: optimizer steps on the local shards, full_state_dict, local_forward."""
import pytest
import torch
import torch.nn.functional as F
from rt_harness import MESHES, batch_for, loss_of, make_model, tiny_config, uniform_plan

from meshplan.ir import trace
from meshplan.ir.placement import Replicate, Shard
from meshplan.runtime import LocalWorld, ParallelModel

OPTIMIZERS = {  # Adam divides by sqrt(v): float32 noise in near-zero gradients moves a parameter by ~1e-6 of lr
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), 1e-6),
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-2), 2e-5),
}


def train_steps(model, opt, steps, reduce_gradients=lambda: None) -> list[float]:
    losses = []
    for tokens, targets in steps:
        opt.zero_grad()
        loss = loss_of(model(tokens), targets)
        loss.backward()
        reduce_gradients()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("strategies", [{"attention": "sp", "moe": "ep"}, {"attention": "tp", "moe": "tp"},
                                        {"attention": "tp", "moe": "ag_scatter", "embedding": "vocab"}])
def test_optimizer_steps_match_single_device(strategies, optimizer):
    make_opt, atol = OPTIMIZERS[optimizer]
    cfg = tiny_config(n_shared_experts=1)
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2,mp2"], strategies)
    steps = [batch_for(cfg, 4, 8, seed=s) for s in range(3)]

    ref = make_model(cfg)
    ref_losses = train_steps(ref, make_opt(ref.parameters()), steps)

    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        losses = train_steps(pm, make_opt(pm.parameters()), steps, pm.reduce_gradients)
        return losses, pm.full_state_dict()

    expected = ref.state_dict()
    for losses, state in world.run(rank):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.allclose(state[k], v, rtol=1e-5, atol=atol), (k, (state[k] - v).abs().max().item())


@pytest.mark.parametrize("head", ["seq", "replicate"])
def test_local_forward_and_a_loss_on_shards(head):
    """The sharded output, and a loss each rank computes on its own tokens (the global mean as a sum of parts).
    With a replicated LM head both ranks of the model axis hold (and compute the loss of) the same tokens."""
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2,mp2"], {"attention": "sp", "moe": "ep", "lm_head": head})
    tokens, targets = batch_for(cfg, 4, 8)
    ref = make_model(cfg)
    ref_out = ref(tokens)
    F.cross_entropy(ref_out.flatten(0, 1), targets.flatten()).backward()
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        out, placement = pm.local_forward(tokens)
        assert placement == (Shard(0), Shard(1) if head == "seq" else Replicate())
        dp, mp = plan.mesh.coords(r)["dp"], plan.mesh.coords(r)["mp"]
        mp = mp if head == "seq" else slice(None)
        mine = _piece(targets, dp, mp)
        loss = F.cross_entropy(out.flatten(0, 1), mine.flatten(), reduction="sum") / targets.numel()
        loss.backward()
        pm.reduce_gradients()
        return out.detach(), (dp, mp), pm.full_grads(), pm.comm_stats.total(op="return")

    for out, (dp, mp), grads, gathered in world.run(rank):
        assert torch.allclose(out, _piece(ref_out.detach(), dp, mp), rtol=1e-5, atol=1e-6)
        assert gathered == 0  # no full output was assembled
        for name, p in ref.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-6), name


def _piece(x, dp, mp):
    x = x.chunk(2, 0)[dp]
    return x if mp == slice(None) else x.chunk(2, 1)[mp]

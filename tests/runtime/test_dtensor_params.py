"""ParallelModel's parameters are DTensors (torchtitan's layout): on a dp2 x mp2 tp/ep plan every parameter is an
nn.Parameter holding a DTensor on the model's DeviceMesh with the plan's placements and the model's global shape,
whose full_tensor() is the single-device weight; its gradient is a Partial DTensor on the axes it is replicated on
until reduce_gradients, then a DTensor laid out as the parameter whose full tensor is one device's gradient; torch's
AdamW steps the DTensors (its state is DTensors too) to one device's weights. A one-rank mesh keeps plain tensors.

Mutations tried: reduce_gradients leaving the Partial placements on the gradient (placements differ), to_local
without grad_placements (the replicated gradients claim Replicate before any reduction), the tied output weight
read without its redistribute (loss differs).
"""
import torch
import torch.nn as nn
from rt_harness import batch_for, loss_of, make_model, tiny_config, uniform_plan
from torch.distributed.tensor import DTensor, Partial, Replicate

from meshplan.ir import Mesh, trace
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.device_mesh import dtensor_placements

LR = 1e-2
EPS = 1e-3  # Adam's first step moves by +-lr whatever the gradient's size: a large eps keeps float32 noise small


def test_parameters_grads_and_adamw_are_dtensors_equal_to_one_device():
    cfg = tiny_config(n_shared_experts=1, tie_embeddings=True)
    graph = trace(make_model(cfg))
    mesh = Mesh.of(dp=2, mp=2)
    plan = uniform_plan(graph, mesh, {"attention": "tp", "ffn": "tp", "moe": "ep", "embedding": "vocab"})
    tokens, targets = batch_for(cfg, 4, 8)
    ref = make_model(cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS)
    loss_of(ref(tokens), targets).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt.step()
    world = LocalWorld(4, timeout_s=60)
    groups = world.groups(mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        weights, layouts = {}, {}
        for name, p in pm.named_parameters():
            assert isinstance(p, nn.Parameter) and isinstance(p, DTensor), name
            assert p.device_mesh is pm.device_mesh and p.shape == pm.full_shape(name), name
            layouts[name] = dtensor_placements(groups[r], pm.placement_of(name), p.dim())
            assert p.placements == layouts[name], name
            weights[name] = p.full_tensor().detach().clone()  # a Replicate one is a view of the weight
        opt = torch.optim.AdamW(pm.parameters(), lr=LR, eps=EPS)
        loss = loss_of(pm(tokens), targets)
        loss.backward()
        partial = {n for n, p in pm.named_parameters() if any(isinstance(q, Partial) for q in p.grad.placements)}
        pm.reduce_gradients()
        for name, p in pm.named_parameters():
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, name
        grads = pm.full_grads()
        opt.step()
        moments = {n: type(opt.state[p]["exp_avg"]) for n, p in pm.named_parameters()}
        replicated = {n for n, pl in layouts.items() if all(isinstance(q, Replicate) for q in pl)}
        return loss.item(), weights, grads, pm.full_state_dict(), partial, replicated, moments

    init = make_model(cfg).state_dict()
    for loss, weights, grads, after, partial, replicated, moments in world.run(rank):
        assert replicated and partial >= replicated  # every replicated gradient was a Partial sum before reduce
        assert set(weights) == set(dict(ref.named_parameters()))  # the tied weight once, by its first name
        for name, ref_p in ref.named_parameters():
            assert torch.equal(weights[name], init[name]), name
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6), name
            assert torch.allclose(after[name], ref_p.detach(), rtol=1e-5, atol=2e-5), name
        assert set(moments.values()) == {DTensor}


def test_a_one_rank_mesh_keeps_plain_tensors():
    cfg = tiny_config()
    model = make_model(cfg)
    graph = trace(model)
    pm = ParallelModel(make_model(cfg), uniform_plan(graph, Mesh.of(mp=1), {}), graph=graph)
    assert pm.device_mesh is None
    for name, p in pm.named_parameters():
        assert type(p) is nn.Parameter and torch.equal(p, model.get_parameter(name)), name

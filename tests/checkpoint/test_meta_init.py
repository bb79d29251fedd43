"""Meta-device models: each rank allocates only its shards and fills them from a weight source; the result is the
materialised model's ParallelModel, bit for bit (parameters, loss, gradients), on an in-process world of 2."""
import pytest
import torch
from ckpt_workers import batch, config

from meshplan.ir import Mesh, Plan, PlanError, trace
from meshplan.models import build_model
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.materialize import seeded_init


def _step(pm):
    tokens, targets = batch(0)
    loss = pm.loss(tokens, targets)
    loss.backward()
    pm.reduce_gradients()
    return loss.item(), pm.full_state_dict(), pm.full_grads()


@pytest.mark.parametrize("strategies", [{"attention": "sp", "moe": "ep"}, {"attention": "tp", "moe": "tp"}])
def test_meta_model_equals_materialised(strategies):
    cfg = config()
    plan = Plan.build(trace(build_model(cfg, device="meta")), Mesh.of(mp=2), strategies, axis="mp")
    world = LocalWorld(2, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        meta = build_model(cfg, device="meta")
        lazy = ParallelModel(meta, plan, groups=groups[r], init=seeded_init(meta, seed=5))
        sizes = {n: p.to_local().numel() for n, p in lazy.named_parameters()}
        eager = ParallelModel(build_model(cfg, seed=5), plan, groups=groups[r])
        return sizes, _step(lazy), _step(eager)

    for sizes, (loss, params, grads), (ref_loss, ref_params, ref_grads) in world.run(rank):
        assert loss == ref_loss
        for name, t in ref_params.items():
            assert torch.equal(params[name], t), name
        for name, t in ref_grads.items():
            assert torch.equal(grads[name], t), name
        full = dict(build_model(cfg, device="meta").named_parameters())
        experts = [n for n in sizes if ".experts." in n]
        assert experts
        for n in experts:  # sharded 2 ways under ep and tp: half of each expert tensor is allocated
            assert sizes[n] * 2 == full[n].numel(), n


def test_meta_model_without_init_is_refused():
    meta = build_model(config(), device="meta")
    plan = Plan.build(trace(meta), Mesh.of(mp=1), {}, axis="mp")
    with pytest.raises(PlanError, match="meta device; pass init="):
        ParallelModel(meta, plan)


def test_init_of_wrong_shape_is_refused():
    meta = build_model(config(), device="meta")
    plan = Plan.build(trace(meta), Mesh.of(mp=1), {}, axis="mp")
    other = build_model(config().__class__(**(config().to_dict() | {"vocab_size": 32})), device="meta")
    with pytest.raises(ValueError, match="tok_embeddings.weight' has shape"):
        ParallelModel(meta, plan, init=seeded_init(other))

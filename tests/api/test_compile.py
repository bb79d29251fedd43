"""meshplan.compile: planning, overrides, caching, inspection, and a real 2-rank run equal to one device."""
import json

import pytest
import torch
import torch.nn.functional as F

import meshplan
from meshplan.api import cache_info
from meshplan.ir import Mesh, Plan, PlanError
from meshplan.models import build_model, load_config
from meshplan.runtime.launch import spawn

TOKENS = (torch.zeros(4, 32, dtype=torch.long),)


def tiny():
    return build_model(load_config("tiny"), seed=0)


def test_plans_without_a_process_group():
    cm = meshplan.compile(tiny(), cluster="h800", world_size=4, example_inputs=TOKENS)
    assert cm.plan.mesh.size == 4 and not cm.distributed
    cm.plan.validate(cm.graph, batch=4, seq=32)
    assert cm.plan.meta["pipeline"]["stages"] == 1  # the runtime executes no pipeline stages
    t = torch.randint(0, 256, (4, 32))
    torch.testing.assert_close(cm(t), cm.module(t))  # plan-only: the original model runs
    text = cm.explain()
    assert "layers.*.attention" in text and "predicted on h800" in text
    assert cm.schedule.makespan > 0


def test_cache_hits_for_same_structure_and_misses_otherwise():
    before = cache_info()
    a = meshplan.compile(tiny(), cluster="h800", world_size=2, example_inputs=TOKENS)
    b = meshplan.compile(build_model(load_config("tiny"), seed=5), cluster="h800", world_size=2,
                         example_inputs=TOKENS)  # other weights, same structure: cached
    assert cache_info() == before + 1 and a.plan == b.plan and a.graph is b.graph
    meshplan.compile(tiny(), cluster="h800", world_size=1, example_inputs=TOKENS)  # other world: planned anew
    assert cache_info() == before + 2


def test_overrides_replace_ops_and_are_validated(tmp_path):
    mesh = Mesh.of(mp=2)
    cm = meshplan.compile(tiny(), cluster="h800", world_size=2, mesh=mesh, example_inputs=TOKENS, overrides={
        "layers.0.attention": {"strategy": "tp", "axis": "mp", "input": ["R"], "output": ["P(sum)"]}})
    assert cm.plan.ops["layers.0.attention"].strategy == "tp"
    assert cm.plan.meta["overridden"] == ["layers.0.attention"]
    with pytest.raises(PlanError, match=r"plan.ops\['layers.0.attention'\]: on its model axis mp, strategy sp"):
        meshplan.compile(tiny(), cluster="h800", world_size=2, mesh=mesh, example_inputs=TOKENS, overrides={
            "layers.0.attention": {"strategy": "sp", "axis": "mp", "input": ["R"], "output": ["R"]}})
    path = tmp_path / "p.yaml"
    cm.save_plan(path)
    again = meshplan.compile(tiny(), cluster="h800", world_size=2, plan=path, example_inputs=TOKENS)
    assert again.plan == Plan.from_yaml(path)


def test_bad_inputs_fail_before_any_process():
    with pytest.raises(PlanError, match="has 4 ranks, but the world has 2"):
        plan = meshplan.compile(tiny(), cluster="h800", world_size=4, example_inputs=TOKENS).plan
        meshplan.compile(tiny(), cluster="h800", world_size=2, plan=plan, example_inputs=TOKENS)
    with pytest.raises(Exception, match="cluster"):
        meshplan.compile(tiny(), cluster="no-such-cluster", world_size=2, example_inputs=TOKENS)


def _train_three_steps(model, reduce_gradients=lambda: None) -> list[float]:
    """Losses of 3 seeded AdamW steps on random tokens (the same batches wherever it runs)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        data = torch.randint(0, 256, (4, 33), generator=gen)
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        reduce_gradients()
        opt.step()
        losses.append(loss.item())
    return losses


def _rank(rank, world, plan_yaml, out):
    cm = meshplan.compile(tiny(), cluster="local", plan=Plan.from_yaml(plan_yaml), example_inputs=TOKENS)
    assert cm.distributed
    losses = _train_three_steps(cm, cm.reduce_gradients)
    if rank == 0:
        out.write_text(json.dumps(losses))


def test_compiled_model_trains_like_one_device_on_two_ranks(tmp_path):
    plan = meshplan.compile(tiny(), cluster="local", world_size=2, example_inputs=TOKENS, error_budget=0.0).plan
    plan.to_yaml(tmp_path / "plan.yaml")
    spawn(2, _rank, str(tmp_path / "plan.yaml"), tmp_path / "losses.json")
    ref = _train_three_steps(tiny())
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_compiled_model_loss_is_the_single_device_loss_on_local_shards():
    from meshplan.ir import trace
    from meshplan.runtime import LocalWorld

    data = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    tokens, targets = data[:, :-1], data[:, 1:]
    ref = tiny()
    ref_loss = F.cross_entropy(ref(tokens).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    plan = Plan.build(trace(tiny()), Mesh.of(dp=2, mp=2), {"attention": "sp", "moe": "ep"})
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        cm = meshplan.compile(tiny(), plan=plan, example_inputs=(tokens,), groups=groups[r], verify=False)
        loss = cm.loss(tokens, targets)
        loss.backward()
        cm.reduce_gradients()
        return loss.item(), cm.module.full_grads()["layers.0.attention.wq.weight"]

    for loss, grad in world.run(rank):
        assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
        torch.testing.assert_close(grad, ref.layers[0].attention.wq.weight.grad, rtol=1e-5, atol=1e-6)
    plain = meshplan.compile(tiny(), plan=Plan.build(trace(tiny()), Mesh.of(dp=1)), example_inputs=(tokens,))
    assert plain.loss(tokens, targets).item() == pytest.approx(ref_loss.item(), rel=1e-6)

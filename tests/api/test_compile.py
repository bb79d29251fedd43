"""meshplan.compile: planning, overrides, caching, inspection, and a real 2-rank run equal to one device."""
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
    # plan-only: the original model runs (compared with one built apart from it, not with cm.module itself)
    assert cm.module is not None and not isinstance(cm.module, meshplan.CompiledModel)
    torch.testing.assert_close(cm(t), tiny()(t), rtol=0, atol=0)
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


def _train_three_steps(model, reduce_gradients=lambda: None, grads=lambda: None) -> tuple[list[float], dict]:
    """Losses of 3 seeded AdamW steps on random tokens (the same batches wherever it runs), and the full
    gradients of the first step (`grads()`; the plain model's own .grad when it returns None)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses, first = [], None
    for _ in range(3):
        data = torch.randint(0, 256, (4, 33), generator=gen)
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        reduce_gradients()
        if first is None:
            first = grads() or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first


def _sharding_overrides(graph) -> dict:
    """Ulysses sequence-parallel attention and expert-parallel MoE on the model axis, for every layer."""
    from meshplan.ir import graph as G
    from meshplan.ir.strategies import STRATEGIES

    out = {}
    for op in graph.ops():
        strategy = {G.ATTENTION: "sp", G.MOE: "ep"}.get(op.kind)
        if strategy:
            i, o = STRATEGIES[op.kind][strategy].io[0]
            out[op.name] = {"strategy": strategy, "axis": "mp", "input": [str(i)], "output": [str(o)]}
    return out


def _rank(rank, world, plan_yaml, out):
    cm = meshplan.compile(tiny(), cluster="local", plan=Plan.from_yaml(plan_yaml), example_inputs=TOKENS)
    assert cm.distributed
    losses, grads = _train_three_steps(cm, cm.reduce_gradients, cm.module.full_grads)
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, out)


def test_compiled_model_trains_like_one_device_on_two_ranks(tmp_path):
    """A plan that shards attention (Ulysses all-to-alls) and the MoE (expert-parallel dispatch/combine) on 2
    gloo ranks: the first step's loss and every parameter's gradient, and 3 AdamW steps' losses, equal one
    device's. Mutations tried: ParallelModel's gradient reduction skipped (GradReducer.reduce loops over no
    bucket): fails; the Ulysses all-to-all's split and concat dims swapped: fails."""
    mesh = Mesh.of(mp=2)
    plain = meshplan.compile(tiny(), cluster="local", world_size=2, mesh=mesh, example_inputs=TOKENS)
    cm = meshplan.compile(tiny(), cluster="local", world_size=2, mesh=mesh, example_inputs=TOKENS,
                          overrides=_sharding_overrides(plain.graph))
    kinds = {p.strategy for name, p in cm.plan.ops.items() if name.endswith((".attention", ".feed_forward"))}
    assert kinds == {"sp", "ep"} and cm.plan.mesh.to_dict() == {"mp": 2}
    cm.plan.to_yaml(tmp_path / "plan.yaml")
    spawn(2, _rank, str(tmp_path / "plan.yaml"), tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")  # written by this test's own rank 0
    ref_losses, ref_grads = _train_three_steps(tiny())
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert set(got["grads"]) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_model_loss_is_the_single_device_loss_on_local_shards():
    from meshplan.ir import trace
    from meshplan.runtime import LocalWorld

    data = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    tokens, targets = data[:, :-1], data[:, 1:]
    ref = tiny()
    ref_loss = F.cross_entropy(ref(tokens).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    plan = Plan.build(trace(tiny()), Mesh.of(dp=2, mp=2), {"attention": "sp", "moe": "ep"})
    world = LocalWorld(4, timeout_s=300)
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

"""Pipeline stages (runtime/pipeline.py) on 4 in-process gloo ranks equal one device over optimizer steps."""
import pytest
import torch
import torch.nn.functional as F

from meshplan.ir import Mesh, Plan, PlanError, trace
from meshplan.ir.pipeline import Pipeline
from meshplan.models import build_model, load_config
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.data import ShardedLoader, TokenStream
from meshplan.runtime.pipeline import PipelineRunner, bubble_fraction, full_mesh, schedule_order

STEPS, BATCH, SEQ = 3, 4, 16


def small():
    return build_model(load_config("small"), seed=0)


def _reference(cfg, batches):
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses, grads = [], []
    for x, y in batches:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        losses.append(loss.item())
    return losses, grads


CASES = {"pp2xmp2-sp-ep-uneven": (Mesh.of(mp=2), {"attention": "sp", "moe": "ep"}, (3, 1), "1f1b", True, 4),
         "pp2xdp2-gpipe": (Mesh.of(dp=2), None, None, "gpipe", False, 2)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_steps_match_one_device(case):
    mesh, strategies, lps, schedule, local, m = CASES[case]
    cfg = load_config("small")
    graph = trace(small())
    plan = Plan.build(graph, mesh, strategies or {}, axis=None if strategies is None else "auto")
    plan.pipeline = Pipeline(2, lps, microbatches=m, schedule=schedule)
    plan = Plan.from_yaml(plan.to_yaml())  # what `meshplan run --plan` reads
    assert plan.world_size == 4 and plan.pipeline.layers_per_stage == lps
    loader = ShardedLoader(TokenStream.synthetic(cfg.vocab_size, seed=1), BATCH, SEQ, (), [])
    batches = [loader.global_batch(k) for k in range(STEPS)]
    ref_losses, ref_grads = _reference(cfg, batches)
    world = LocalWorld(4, timeout_s=60)
    groups = world.groups(full_mesh(plan))

    def rank(r):
        runner = PipelineRunner(small(), plan, graph, groups=groups[r])
        opt = torch.optim.SGD(runner.parameters(), lr=0.5, momentum=0.9)
        data = ShardedLoader(TokenStream.synthetic(cfg.vocab_size, seed=1), BATCH, SEQ,
                             runner.model.input_placement() if local else (), runner.model.axes if local else [])
        losses, grads = [], []
        for k in range(STEPS):
            x, y = data.batch_at(k)
            opt.zero_grad()
            losses.append(runner.step(x, y, local=local))
            runner.reduce_gradients()
            grads.append(runner.full_grads())
            opt.step()
        return runner.stage, losses, grads, runner.trace

    owned, orders = set(), {}
    for stage, losses, grads, trace_ in world.run(rank):
        orders.setdefault(stage, [(kind, i) for kind, i, *_ in trace_[-2 * m:]])  # the last step's events
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for k in range(STEPS):
            for name, g in grads[k].items():
                owned.add(name)
                torch.testing.assert_close(g, ref_grads[k][name], rtol=1e-5, atol=1e-6, msg=f"step {k} {name}")
        if schedule == "1f1b" and stage == 1:  # the last stage alternates from the start
            assert [kind for kind, *_ in trace_[:4]] == ["F", "B", "F", "B"]
        if schedule == "gpipe":
            assert [kind for kind, *_ in trace_[:2 * m]] == ["F"] * m + ["B"] * m
    assert owned == set(ref_grads[0])  # the stages together hold every parameter
    # The schedule that ran has the planner's bubble, (pp - 1) / (m + pp - 1) (planner/plans.py summary).
    assert bubble_fraction([orders[0], orders[1]]) == pytest.approx(1 / (m + 1))


def test_pipeline_plans_are_refused_where_they_cannot_run():
    graph = trace(small())
    plan = Plan.build(graph, Mesh.of(mp=2), {})
    plan.pipeline = Pipeline(2, (2, 1))
    with pytest.raises(PlanError, match=r"layers_per_stage: \[2, 1\] sums to 3, but the model has 4 layers"):
        Plan.from_yaml(plan.to_yaml()).validate(graph)
    plan.pipeline = Pipeline(2)
    with pytest.raises(PlanError, match="one ParallelModel per stage"):
        ParallelModel(small(), plan, graph)
    text = plan.to_yaml().replace("mesh: {pp: 2, mp: 2}", "mesh: {mp: 2, pp: 2}")
    assert "mesh: {mp: 2, pp: 2}" in text
    with pytest.raises(PlanError, match="pipeline axis must come first"):
        Plan.from_yaml(text)


def test_weights_tied_across_stages_are_refused():
    from meshplan.models import ModelConfig
    from meshplan.runtime.pipeline import check_untied, stage_ops

    cfg = ModelConfig(name="tied", vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16,
                      n_experts=2, top_k=1, max_seq_len=8, tie_embeddings=True)
    model = build_model(cfg, seed=0)
    graph = trace(model)
    plan = Plan.build(graph, Mesh.of(dp=1), {})
    plan.pipeline = Pipeline(2)
    ops, crossing = stage_ops(graph, plan)
    assert crossing == [["layers.0.add_1"]]  # the residual stream is all that crosses
    with pytest.raises(PlanError, match=r"tok_embeddings.weight is used by stages 0 and 1 \(tied weights"):
        check_untied(model, graph, ops)
    untied = small()
    graph = trace(untied)
    plan = Plan.build(graph, Mesh.of(dp=1), {})
    plan.pipeline = Pipeline(2)
    check_untied(untied, graph, stage_ops(graph, plan)[0])  # separate weights: accepted


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("pp,m", [(4, 8), (4, 2), (3, 5)])
def test_schedules_have_the_planners_bubble(schedule, pp, m):
    orders = [schedule_order(schedule, s, pp, m) for s in range(pp)]
    for order in orders:  # every micro-batch once forward, once backward, forward first
        assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(m))
    if schedule == "1f1b":  # at most pp - s micro-batches in flight on stage s (1F1B's memory bound)
        for s, order in enumerate(orders):
            live = [sum(1 if k == "F" else -1 for k, _ in order[:j + 1]) for j in range(len(order))]
            assert max(live) == min(pp - s, m)
    for t_b in (1.0, 2.0):
        assert bubble_fraction(orders, 1.0, t_b) == pytest.approx((pp - 1) / (m + pp - 1))

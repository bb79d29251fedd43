"""ParallelModel's parameter half (runtime/parameters.py) on a pipeline stage: what full_state_dict() returns."""
import torch
from rt_harness import make_model, tiny_config

from meshplan.ir import trace
from meshplan.runtime import LocalWorld


def test_pipeline_stage_full_state_dict_holds_its_own_parameters():
    """pp=2 x dp=2: each stage's full_state_dict() is its own parameters in full (and the model's buffers); the
    stages' dicts together are the model's state dict, values equal. (It raised KeyError on the other stage's
    parameters before.)"""
    from meshplan.ir import Mesh, Plan
    from meshplan.ir.pipeline import Pipeline
    from meshplan.runtime.pipeline import PipelineRunner, full_mesh

    cfg = tiny_config(n_layers=2)
    graph = trace(make_model(cfg))
    plan = Plan.build(graph, Mesh.of(dp=2), {}, axis=None)
    plan.pipeline = Pipeline(2, None, microbatches=2, schedule="gpipe")
    world = LocalWorld(4, timeout_s=60)
    groups = world.groups(full_mesh(plan))

    def rank(r):
        runner = PipelineRunner(make_model(cfg), plan, graph, groups=groups[r])
        return runner.stage, runner.model.full_state_dict(), {n for n, _ in runner.model.named_parameters()}

    ref = make_model(cfg)
    expected, params = ref.state_dict(), {n for n, _ in ref.named_parameters()}
    merged, by_stage = {}, {}
    for stage, state, own in world.run(rank):
        assert {k for k in state if k in params} == own  # only its own parameters
        by_stage.setdefault(stage, set(own))
        merged.update(state)
    assert by_stage[0] and by_stage[1] and not by_stage[0] & by_stage[1]
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)

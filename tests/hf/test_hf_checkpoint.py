"""An HF safetensors checkpoint (per-expert tensors, as on the Hub) loads into each rank's shards of a model that
never holds its full weights; the run then equals HF's own model."""
import pytest

pytest.importorskip("transformers")


from hf_harness import GRAD_RTOL, LOSS_TOL  # noqa: E402
from hf_models import batch, hf_model, hf_reference, loss_of  # noqa: E402

from meshplan.hf.checkpoint import empty_model, load_shards  # noqa: E402
from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.runtime import LocalWorld, ParallelModel  # noqa: E402
from meshplan.runtime.device_mesh import local_tensor  # noqa: E402


@pytest.mark.parametrize("family, strategies, mesh", [
    ("mixtral", {"attention": "sp", "moe": "ep"}, Mesh.of(mp=2)),
    ("qwen2_moe", {"attention": "tp", "moe": "tp"}, Mesh.of(mp=2)),
    ("deepseek_v3", {"attention": "tp", "moe": "ag_scatter"}, Mesh.of(dp=2, mp=2)),
])
def test_checkpoint_loads_into_shards_equal_hf(tmp_path, family, strategies, mesh):
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    tokens, targets = batch()
    ref_loss, ref_grads = hf_reference(family, tokens, targets)
    fronts = [empty_model(model.config) for _ in range(mesh.size)]
    assert all(p.stride() == (0,) * p.dim() for p in fronts[0].parameters())  # no memory behind them
    graph = trace(fronts[0], (tokens,))
    plan = Plan.build(graph, mesh, strategies)
    world = LocalWorld(mesh.size, timeout_s=60)
    groups = world.groups(mesh)

    def rank(r):
        pm = ParallelModel(fronts[r], plan, graph=graph, groups=groups[r])
        load_shards(pm, fronts[r], tmp_path)
        loss = loss_of(pm(tokens), targets)
        loss.backward()
        pm.reduce_gradients()
        held = sum(local_tensor(p).numel() for p in pm.parameters())
        return loss.item(), {fronts[r].hf_names[n]: g for n, g in pm.full_grads().items()}, held

    for loss, grads, held in world.run(rank):
        assert abs(loss - ref_loss) < LOSS_TOL
        for name, ref in ref_grads.items():
            assert (grads[name] - ref).abs().max() <= GRAD_RTOL * ref.abs().max() + 1e-7, name
        assert held < sum(p.numel() for p in model.parameters())  # the experts are split, not all loaded
    assert all(p.stride() == (0,) * p.dim() for p in fronts[0].parameters())

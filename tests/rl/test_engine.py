"""The runtime-backed Engine: a data-parallel plan, forward equal to the plain module, an AdamW step equal to
the same step on the plain module, and the weight sync into the rollout model."""
import torch

from meshplan.models import build_model, load_config
from meshplan.rl.distributed import free_port, init, shard
from meshplan.rl.engine import RuntimeEngine, data_parallel_plan, make_optimizer, sync_rollout_model


def test_plan_is_data_parallel():
    plan = data_parallel_plan(build_model(load_config("tiny")), world=4)
    assert plan.mesh.to_dict() == {"dp": 4, "mp": 1}
    assert all(str(op.input[0]) == str(op.output[0]) == "S(0)" for op in plan.ops.values())  # batch-sharded


def test_engine_matches_the_plain_module():
    init(0, 1, free_port())  # a one-rank gloo group, as `meshplan train --nproc 1` makes
    try:
        _engine_matches_the_plain_module()
    finally:
        torch.distributed.destroy_process_group()


def _engine_matches_the_plain_module():
    tokens = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    for head in ("lm", "value"):
        plain = build_model(load_config("tiny"), head=head, seed=1)
        engine = RuntimeEngine(build_model(load_config("tiny"), head=head, seed=1), lr=1e-2, grad_clip=0.0)
        torch.testing.assert_close(engine(tokens), plain(tokens))
        opt = make_optimizer(plain.parameters(), 1e-2, (0.9, 0.999), 0.0)
        for _ in range(2):
            engine.backward(engine(tokens).float().square().mean())
            engine.step()
            plain(tokens).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        full = engine.full_state_dict()
        for k, v in plain.state_dict().items():
            torch.testing.assert_close(full[k], v, atol=1e-6, rtol=1e-5)
        rollout = build_model(load_config("tiny"), head=head, seed=99)
        sync_rollout_model(engine, rollout)
        torch.testing.assert_close(rollout(tokens), engine(tokens))


def test_shard_splits_prompts_in_order():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]

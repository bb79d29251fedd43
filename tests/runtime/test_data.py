"""Per-rank data (runtime/data.py): every rank reads only its shard, the shards tile the global batch, and
training on them equals one device trained on the global batches."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rt_harness import MESHES, make_model, tiny_config, uniform_plan

from meshplan.ir import trace
from meshplan.runtime import LocalWorld, ParallelModel
from meshplan.runtime.data import DataError, ShardedLoader, TokenStream


def _stream(tmp_path, kind, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, 700)
    if kind == "synthetic":
        return TokenStream.synthetic(vocab, seed=3)
    if kind == "npy":
        np.save(tmp_path / "ids.npy", ids.astype(np.int32))
        return TokenStream.from_file(tmp_path / "ids.npy", vocab)
    ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
    return TokenStream.from_file(tmp_path / "ids.bin", vocab, "uint16")


@pytest.mark.parametrize("kind", ["synthetic", "npy", "bin"])
def test_sp_dp_training_on_per_rank_shards_equals_one_device(tmp_path, kind):
    cfg = tiny_config()
    graph = trace(make_model(cfg))
    plan = uniform_plan(graph, MESHES["dp2,mp2"], {"attention": "sp", "moe": "ep"})
    stream = _stream(tmp_path, kind, cfg.vocab_size)
    ref = make_model(cfg)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    whole = ShardedLoader(stream, 4, 8, (), [], seed=1)
    ref_losses = []
    for step in range(2):
        x, y = whole.global_batch(step)
        loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        pm = ParallelModel(make_model(cfg), plan, graph=graph, groups=groups[r])
        loader = ShardedLoader(stream, 4, 8, pm.input_placement(), pm.axes, seed=1)
        opt = torch.optim.SGD(pm.parameters(), lr=0.1)
        losses, shards = [], []
        for step in range(2):
            x, y = loader.batch_at(step)
            shards.append((loader.rows, loader.cols, x))
            pm.comm_stats.reset()
            loss = pm.loss(x, y, local=True)
            opt.zero_grad()
            loss.backward()
            pm.reduce_gradients()
            opt.step()
            losses.append(loss.item())
        return losses, shards, pm.comm_stats.total(op="return")

    tiles = torch.full((4, 8), -1)
    for losses, shards, gathered in world.run(rank):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert gathered == 0
        (r0, r1), (c0, c1), x = shards[0]
        assert x.shape == (2, 4)  # half the rows (dp=2), half the sequence (sp over mp=2)
        tiles[r0:r1, c0:c1] = x
    assert torch.equal(tiles, whole.global_batch(0)[0])


def test_bad_token_data_is_refused_naming_the_file(tmp_path):
    np.save(tmp_path / "f.npy", np.array([[1, 2], [3, 4]]))
    with pytest.raises(DataError, match="1-D array"):
        TokenStream.from_file(tmp_path / "f.npy", 16)
    np.save(tmp_path / "big.npy", np.arange(40))
    loader = ShardedLoader(TokenStream.from_file(tmp_path / "big.npy", 16), 2, 8, (), [])
    with pytest.raises(DataError, match="outside model.vocab_size=16"):
        for step in range(3):
            loader.batch_at(step)
    with pytest.raises(DataError, match="raw token format"):
        (tmp_path / "x.bin").write_bytes(b"\0" * 8)
        TokenStream.from_file(tmp_path / "x.bin", 16, "float32")

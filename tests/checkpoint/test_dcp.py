"""DCP checkpoints: saved under tp/ep on 4 ranks, loaded under sp/tp on 2 ranks bit-identically (parameters and
AdamW state), exported to one torch.save file, and written atomically. Real processes: DCP needs the default
process group, which the in-process thread worlds do not have (meshplan/runtime/checkpoint.py)."""
import torch
from ckpt_workers import config, load_worker, save_worker

from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model
from meshplan.runtime import checkpoint as ckpt
from meshplan.runtime.launch import spawn


def _plan(mesh: Mesh, strategies: dict[str, str]) -> str:
    graph = trace(build_model(config(), device="meta"))
    return Plan.build(graph, mesh, strategies, axis="mp").to_yaml()


def test_save_4_ranks_tp_ep_load_2_ranks_sp_tp(tmp_path):
    saved = _plan(Mesh.of(dp=2, mp=2), {"attention": "tp", "moe": "ep"})
    spawn(4, save_worker, saved, str(tmp_path), timeout_s=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.pt", "step_000002"]  # no temporary left
    assert ckpt.latest(tmp_path) == tmp_path / "step_000002"

    loading = _plan(Mesh.of(mp=2), {"attention": "sp", "moe": "tp"})
    spawn(2, load_worker, loading, str(tmp_path), timeout_s=60)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    loaded = torch.load(tmp_path / "loaded2.pt", weights_only=True)
    assert loaded["step"] == 2
    assert expected["model"].keys() == loaded["model"].keys()
    for name, t in expected["model"].items():
        assert torch.equal(t, loaded["model"][name]), name
    assert expected["optim"].keys() == loaded["optim"].keys()
    for name, t in expected["optim"].items():
        assert torch.equal(t, loaded["optim"][name]), name
    assert torch.isfinite(torch.tensor(loaded["loss"]))

    out = ckpt.export(tmp_path / "step_000002", tmp_path / "full.pt")
    exported = torch.load(out, weights_only=True)  # plain tensors only: nothing else is unpickled
    assert int(exported["step"]) == 2
    params = {n for n, _ in build_model(config(), device="meta").named_parameters()}
    assert set(exported["model"]) == params
    for name in params:
        assert torch.equal(exported["model"][name], expected["model"][name]), name
        assert torch.equal(exported["optim"][f"{name}.exp_avg_sq"], expected["optim"][f"{name}.exp_avg_sq"]), name


def test_latest_ignores_unfinished_saves(tmp_path):
    """A save that died before its rename leaves only a hidden temporary directory: never a checkpoint."""
    assert ckpt.latest(tmp_path / "absent") is None
    (tmp_path / "step_000003").mkdir()
    (tmp_path / ".tmp_step_000009").mkdir()
    (tmp_path / "step_x").mkdir()
    assert ckpt.latest(tmp_path) == tmp_path / "step_000003"
    assert ckpt.step_dir(tmp_path, 12).name == "step_000012"

"""rl.plan checked in the launcher (one line naming the field), and the progress bar's fields."""
import pytest

from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config
from meshplan.rl.config import PlanConfig, RLConfigError
from meshplan.rl.planning import check_plan_config, compile_options, parse_mesh, parse_strategies
from meshplan.rl.progress import postfix


def test_mesh_and_strategies_parse():
    assert parse_mesh("dp=2, mp=4") == Mesh.of(dp=2, mp=4)
    assert parse_strategies("attention=sp,moe=ep") == {"attention": "sp", "moe": "ep"}
    for bad in ("dp2", "dp=x", "dp=1,dp=2"):
        with pytest.raises(RLConfigError, match="rl.plan.mesh"):
            parse_mesh(bad)
    with pytest.raises(RLConfigError, match="rl.plan.strategies: 'moe=sp' is not KIND=STRATEGY"):
        parse_strategies("moe=sp")


@pytest.mark.parametrize("fields, nproc, match", [
    ({"mesh": "dp=1,mp=4"}, 2, r"rl.plan.mesh: \(dp=1, mp=4\) has 4 ranks, but train.nproc is 2"),
    ({"cluster": "no-such-cluster"}, 1, "rl.plan.cluster"),
    ({"plan": "missing.yaml"}, 1, "rl.plan.plan: 'missing.yaml' is not 'auto' or a plan YAML file"),
    ({"strategies": "attention=tp", "critic_plan": "x.yaml"}, 2, "rl.plan.strategies: give strategies or plan"),
])
def test_plan_config_refused(fields, nproc, match):
    with pytest.raises(RLConfigError, match=match):
        check_plan_config(PlanConfig(**fields), nproc)


def test_plan_file_world_and_critic_mesh(tmp_path):
    """A plan file must have nproc ranks; with no critic plan, the critic is planned on the policy plan's mesh."""
    path = tmp_path / "p.yaml"
    Plan.build(trace(build_model(load_config("tiny"))), Mesh.of(dp=2, mp=2)).to_yaml(path)
    with pytest.raises(RLConfigError, match=r"rl.plan.plan: .* \(4 ranks\), but train.nproc is 2"):
        check_plan_config(PlanConfig(plan=str(path)), 2)
    check_plan_config(PlanConfig(plan=str(path)), 4)
    critic = compile_options(PlanConfig(plan=str(path)), (8, 32), 0, critic=True)
    assert critic["plan"] == "auto" and critic["mesh"] == Mesh.of(dp=2, mp=2)


def test_progress_bar_fields():
    rec = {"reward": 0.25, "accuracy": 0.25, "response_len": 17.0, "value_loss": 0.0123}
    assert postfix(rec, 0.5) == {"reward": "0.250", "acc": "0.250", "eval": "0.500", "len": "17.0",
                                 "vloss": "0.0123"}
    assert postfix({**rec, "eval_accuracy": 0.75}, 0.5)["eval"] == "0.750"  # this step's evaluation wins
    grpo = {k: v for k, v in rec.items() if k != "value_loss"}
    assert postfix(grpo, None) == {"reward": "0.250", "acc": "0.250", "len": "17.0"}


def test_backend_follows_each_ranks_device(monkeypatch):
    """NCCL only when every local rank gets a GPU of its own (not because some GPU exists); gloo otherwise."""
    import torch

    from meshplan.rl.distributed import backend_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert backend_for(1) == "nccl" and backend_for(2) == "gloo" and backend_for(2, "nccl") == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert backend_for(1) == "gloo"


def test_nccl_without_gpus_is_refused_in_the_launcher(monkeypatch):
    import torch

    from meshplan.rl.config import config_from_dict
    from meshplan.rl.trainer import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = config_from_dict({"model": "tiny", "algo": {"preset": "grpo"}, "train": {"backend": "nccl"}})
    with pytest.raises(RLConfigError, match="rl.train.backend: nccl needs a GPU per local rank; this machine has 0"):
        preflight(cfg)
    cfg.train.backend = "mpi"
    with pytest.raises(RLConfigError, match="rl.train.backend: 'mpi' is not one of auto, gloo, nccl"):
        preflight(cfg)


def test_launch_joins_torchruns_world(monkeypatch):
    """Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR set) a rank joins the env:// rendezvous with the backend of
    its device and leaves the group afterwards; a train.nproc other than torchrun's world is refused."""
    import socket

    import torch.distributed as dist

    from meshplan.cli_args import RunFailed
    from meshplan.rl.distributed import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    seen = []
    launch(lambda rank, world: seen.append((rank, world, dist.get_backend())), 1, timeout_s=30, backend="gloo")
    assert seen == [(0, 1, "gloo")] and not dist.is_initialized()
    with pytest.raises(RunFailed, match="train.nproc is 2, but the torch.distributed world has 1 ranks"):
        launch(lambda rank, world: None, 2, timeout_s=30, backend="gloo")
    assert not dist.is_initialized()

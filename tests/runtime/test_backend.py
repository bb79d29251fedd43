"""The collective backend is chosen per rank by the device it uses: NCCL only when this rank (and every local rank)
has a GPU of its own, gloo on CPU otherwise; NCCL asked for without a GPU is one line, before any rendezvous."""
import pytest
import torch
import torch.distributed as dist

from meshplan.cli_args import UsageError
from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config
from meshplan.runtime.process_groups import default_backend, init_distributed


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` CUDA devices."""
    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_gpus


@pytest.mark.parametrize("n_gpus, local_rank, local_world, expected", [
    (0, 0, 1, "gloo"),  # a CPU machine
    (1, 0, 1, "nccl"),  # one rank, one GPU
    (4, 3, 4, "nccl"),  # every local rank has its GPU
    (4, 0, 8, "gloo"),  # rank 0 has a GPU, but ranks 4..7 would not: one backend for the whole world
    (4, 5, 8, "gloo"),
    (2, 2, 1, "gloo"),  # LOCAL_RANK beyond the visible devices (CUDA_VISIBLE_DEVICES narrowed)
])
def test_default_backend_by_this_ranks_device(gpus, n_gpus, local_rank, local_world, expected):
    gpus(n_gpus)
    assert default_backend(local_rank, local_world) == expected


def test_default_backend_reads_torchruns_environment(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_backend() == "nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert default_backend() == "gloo"


def test_nccl_without_a_gpu_for_this_rank_is_one_line(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"^backend nccl: local rank 1 has no GPU of its own \(1 CUDA devices"):
        init_distributed("nccl")
    assert not dist.is_initialized()  # refused before any rendezvous


def test_launcher_refuses_nccl_without_enough_gpus(gpus, tmp_path, monkeypatch):
    from meshplan.runtime.launch import _check_backend, build_parser

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    gpus(1)
    args = build_parser().parse_args(["--model", "tiny", "--plan", "p.yaml", "--backend", "nccl"])
    plan = Plan.build(trace(build_model(load_config("tiny"), device="meta")), Mesh.of(mp=2), {})
    with pytest.raises(UsageError, match=r"--backend nccl: 2 ranks need one GPU each, this machine has 1"):
        _check_backend(args, plan)
    gpus(2)
    _check_backend(args, plan)  # enough GPUs: accepted

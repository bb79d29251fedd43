"""Runtime: execute a Plan on torch.distributed ranks, numerically equal to one device."""
from .comm_stats import CommStats
from .executor import ParallelModel
from .grad_clip import clip_grad_norm_, global_grad_norm, grad_pieces
from .local_world import LocalWorld
from .process_groups import MeshGroups, init_distributed
from .redistribute import redistribute
from .zero import GradPiece, ZeroAdamW

__all__ = ["CommStats", "GradPiece", "LocalWorld", "MeshGroups", "ParallelModel", "ZeroAdamW", "cli_run",
           "clip_grad_norm_", "global_grad_norm", "grad_pieces", "init_distributed", "redistribute"]


def cli_run(argv=None) -> int:
    """`meshplan run ...`: see launch.py."""
    from .launch import cli_run as run

    return run(argv)

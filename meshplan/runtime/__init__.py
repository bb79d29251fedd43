"""Runtime: execute a Plan on torch.distributed ranks, numerically equal to one device."""
from .comm_stats import CommStats
from .executor import ParallelModel
from .local_world import LocalWorld
from .process_groups import MeshGroups, init_distributed
from .redistribute import redistribute

__all__ = ["CommStats", "LocalWorld", "MeshGroups", "ParallelModel", "cli_run", "init_distributed",
           "redistribute"]


def cli_run(argv=None) -> int:
    """`meshplan run ...`: see launch.py."""
    from .launch import cli_run as run

    return run(argv)

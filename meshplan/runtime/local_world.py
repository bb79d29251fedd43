"""A whole world of ranks inside one process: one thread per rank, gloo groups over a shared HashStore.

No process start-up and no torch import per rank, so a test can check dozens of plans in seconds. The ranks run
the real collectives (gloo, over loopback) and the real autograd; only the launcher differs from torchrun.
"""
from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

import torch.distributed as dist

from ..ir.mesh import Mesh
from .process_groups import MeshGroups


class LocalWorld:
    def __init__(self, world_size: int, timeout_s: float = 60.0):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.store = dist.HashStore()
        self._meshes = 0

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """fn(rank) on every rank at once; returns the results by rank, or raises the first rank's error."""
        results: list[Any] = [None] * self.world_size
        errors: list[str | None] = [None] * self.world_size

        def work(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException:  # noqa: BLE001 - reported below with the rank
                errors[rank] = traceback.format_exc()

        threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout_s * 2)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"local world: ranks {[r for r, t in enumerate(threads) if t.is_alive()]} still "
                               f"running after {self.timeout_s * 2:.0f} s")
        for rank, err in enumerate(errors):
            if err is not None:
                raise RuntimeError(f"rank {rank} failed:\n{err}")
        return results

    def groups(self, mesh: Mesh) -> list[MeshGroups]:
        """Process groups for `mesh` on every rank (built concurrently, as gloo's rendezvous needs)."""
        self._meshes += 1
        prefix = f"mesh{self._meshes}"
        return self.run(lambda r: MeshGroups.in_process(mesh, r, self.store, self.timeout_s, prefix=prefix))

"""In a process world MeshGroups.from_world builds torch's init_device_mesh named after the plan's axes, takes the
axis groups from it (one set of groups) with the collective timeout asked for, and refuses a Mesh whose groups lay
ranks out otherwise; a dp2 x mp2 plan's DTensor parameters live on it and one step's gradients equal one device's
(mesh_worker.py)."""
from mesh_worker import worker

from meshplan.runtime.local_spawn import spawn


def test_process_world_device_mesh_is_init_device_meshs():
    spawn(4, worker, timeout_s=60)

import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch.fx (via the IR) may import it before any
# kernel test runs: set it for the whole session so the Triton kernels run in the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_default_process_group(request):
    """A test that leaves torch.distributed's default group initialised in this process would turn every later
    compile() into a 1-rank 'distributed' compile: fail the test that leaked it (and clean up for the rest)."""
    import torch.distributed as dist

    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} left torch.distributed's default process group initialised")

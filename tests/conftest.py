import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch.fx (via the IR) may import it before any
# kernel test runs: set it for the whole session so the Triton kernels run in the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


class CodeRunningPickle:
    """Unpickling it creates the directory `marker`: what a crafted checkpoint would run on load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def code_running_pickle():
    return CodeRunningPickle


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch():
    """The in-process worlds run one thread per rank, and the machine has 2 cores: every test runs with one torch
    thread, whichever directory ran first (a session-wide setting must not depend on test order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_leaked_default_process_group(request):
    """A test that leaves torch.distributed's default group initialised in this process would turn every later
    compile() into a 1-rank 'distributed' compile: fail the test that leaked it (and clean up for the rest)."""
    import torch.distributed as dist

    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} left torch.distributed's default process group initialised")

"""The in-process worlds run one thread per rank: keep torch single-threaded so the ranks share the cores."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

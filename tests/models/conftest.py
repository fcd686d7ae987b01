"""One torch thread per test: the test machines are shared, and OpenMP threads competing for busy
cores slow small convolutions down by an order of magnitude."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

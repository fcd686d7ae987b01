"""One torch thread per test: CI and dev machines have 2 cores, and OpenMP threads competing for busy
cores slow small 3D convolutions down by an order of magnitude."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fixtures for the tuning tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: several intra-op threads per process only contend (tiny models run ~10x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Shared test setup: float64 maths, one thread (fast and deterministic on 2-core CI), fixed seeds."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_one_thread():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old_dtype)

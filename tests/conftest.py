"""Shared test setup.

Without a GPU the Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
triton decorates any kernel, so it is set here, before mmfuse is imported. Tests that need a CUDA
device carry the ``cuda`` marker and are skipped without one.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_allocations():
    """torch.empty / empty_like fill float tensors with NaN (ints with their max), so any output
    element a kernel fails to write shows up."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



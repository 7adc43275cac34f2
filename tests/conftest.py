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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



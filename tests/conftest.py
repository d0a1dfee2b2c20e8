"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before triton is
imported anywhere, so it is set here, first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="auto" keeps the fixed order in tests (on a GPU it would otherwise time every backend once per
# shape class and read/write ~/.cache/taopd); tests of the measured choice turn it back on.
os.environ.setdefault("TAOPD_AUTO_MEASURE", "0")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)

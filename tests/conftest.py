import os
import pathlib

import pytest
import torch

import bsam_fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(os.environ.get("BSAM_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))

# Backends of CPU tensors (the GPU tests in test_cuda.py cover "cuda").
BACKENDS = [b for b in bsam_fast.available_backends() if b != "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

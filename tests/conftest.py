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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (long soak, > 2^31 elements)")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if not config.getoption("--run-slow"):
        skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)

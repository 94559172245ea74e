"""Soak: many steps of one optimizer; memory stays flat and the counters stay exact.

The short run is in CI; the long one (10,000 steps) is marked slow:
    pytest --run-slow tests/test_soak.py
"""
import gc
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM
from helpers import make_data, make_model


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def soak(steps: int, backend: str) -> None:
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.01, num_data=1000, backend=backend, seed=1)
    x, y = make_data(n=32)
    poisoned = 0
    warm = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(steps):
            poison = t % 97 == 13

            def closure():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if poison:
                    model.fc2.weight.grad[0, 0] = float("nan")
            if t % 2:
                opt.step(closure)
            else:
                opt.step_parts(lambda k: closure(), 2)
            poisoned += poison
            if t == steps // 10:
                gc.collect()
                warm = rss_mib()
    gc.collect()
    grown = rss_mib() - warm
    draws = sum(1 if t % 2 else 2 for t in range(steps))
    assert opt.noise_offset == draws
    assert opt.skipped_steps == poisoned
    assert not opt.in_step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert grown < 8.0, f"resident memory grew by {grown:.1f} MiB over {steps} steps"


@pytest.mark.parametrize("backend", ["cpu", "foreach"])
def test_short_soak(backend):
    if backend not in __import__("bsam_fast").available_backends():
        pytest.skip(f"{backend} not built")
    soak(600, backend)


@pytest.mark.slow
def test_soak_10000_steps():
    soak(10_000, __import__("bsam_fast").available_backends()[0])

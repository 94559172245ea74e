"""Replay the authors' float64 bSAM trajectories (every .npz in $BSAM_GOLDEN_DIR).

Deviation = max|ours - golden| / max|golden| per tensor, worst over the parameters,
checked after every step for the mean, the momentum and the precision.
"""
import pytest
import torch

from conftest import BACKENDS, GOLDEN_DIR
from golden import replay

GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.npz"))
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def test_golden_files_present():
    assert GOLDEN_FILES, f"no golden .npz files in {GOLDEN_DIR} (set BSAM_GOLDEN_DIR)"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.name for p in GOLDEN_FILES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_replays_official_trajectory(path, backend, dtype):
    tol = TOLERANCE[dtype]
    steps = 0
    for step, worst, loss, golden_loss in replay(path, backend, dtype):
        for key, dev in worst.items():
            assert dev <= tol, f"step {step}: {key} deviates by {dev:.3g} (> {tol:g})"
        assert loss == pytest.approx(golden_loss, rel=10 * tol)
        steps += 1
    assert steps > 0

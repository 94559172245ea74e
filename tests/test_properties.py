"""Property-based differential test (hypothesis, derandomised): random parameter lists
(empty, 0-dim and odd shapes, every dtype, mixed dtypes in a group, several groups),
m parts, all three drivers, injected inf/NaN, cancels, exceptions from closures and from
inside the update, and cross-backend state_dict reloads.

Properties: every backend equals `reference` within the dtype's tolerance; a skipped,
cancelled or failed step restores everything bit for bit; `noise_offset` counts the draws.

    BSAM_PROPERTY_EXAMPLES=500 pytest tests/test_properties.py     # more examples
"""
import os
import warnings

import numpy as np
import pytest
import torch

from bsam_fast import BSAM
from conftest import BACKENDS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("BSAM_PROPERTY_EXAMPLES", "30"))
# ("numpy", shape): an empty tensor made from NumPy (strides all 0, as NumPy gives them).
SHAPES = [(), (0,), (1,), (3,), (5, 2), (2, 3, 2), (7,), (4, 1, 3), ("numpy", (3, 0, 2)), ("numpy", (0,))]
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}

scenario = st.fixed_dictionaries({
    "groups": st.lists(st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES)),
                                min_size=1, max_size=3), min_size=1, max_size=3),
    "driver": st.sampled_from(["step", "step_parts", "phases"]),
    "m": st.integers(1, 3),
    "steps": st.lists(st.sampled_from(["ok", "ok", "inf_noisy", "nan_perturbed", "closure_error",
                                       "update_error", "cancel"]), min_size=1, max_size=4),
    "reload_at": st.integers(0, 4),
    "seed": st.integers(0, 2 ** 64 - 1),
})


class Injected(RuntimeError):
    pass


def _tensor(shape, dtype, g):
    if shape and shape[0] == "numpy":
        t = torch.from_numpy(np.zeros(shape[1], dtype=NUMPY_DTYPES.get(dtype, np.float32)))
        return t if t.dtype == dtype else t.to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def build(sc, backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups, params = [], []
    for k, spec in enumerate(sc["groups"]):
        ps = [torch.nn.Parameter(_tensor(shape, dtype, g)) for shape, dtype in spec]
        params += ps
        groups.append({"params": ps, "lr": 0.05 * (k + 1), "rho": 0.02 * (k + 1)})
    opt = BSAM(groups, lr=0.05, num_data=20, weight_decay=1e-3, backend=backend, seed=sc["seed"])
    return params, opt


def loss_of(params, part):
    return sum(((p.float().sin() * p.float()).sum() * (i + 1 + part)) for i, p in enumerate(params))


def snapshot(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for _, v in sorted(opt.state[p].items())]
    return out


def run_step(opt, params, sc, event):
    """One step of the scenario's driver; returns "done", "skipped" or "failed"."""
    m = sc["m"] if sc["driver"] != "step" else 1
    poisoned = {"n": 0}

    def closure(part=0, zero=True):
        if zero:
            opt.zero_grad()
        loss_of(params, part).backward()
        poisoned["n"] += 1
        if event == "closure_error":
            raise Injected("closure")
        nonempty = [p for p in params if p.numel() > 0]
        if nonempty and ((event == "inf_noisy" and poisoned["n"] == 1)
                         or (event == "nan_perturbed" and poisoned["n"] == 2 * m)):
            nonempty[0].grad.view(-1)[0] = float("inf") if event == "inf_noisy" else float("nan")
        return torch.zeros(())
    original_update = opt._backend.prepare_update
    if event == "update_error":
        def failing(*args, **kwargs):
            raise Injected("update")
        opt._backend.prepare_update = failing
    try:
        if sc["driver"] == "step":
            opt.step(closure)
        elif sc["driver"] == "step_parts":
            opt.step_parts(closure, m)
        else:
            opt.zero_grad()
            for k in range(m):
                opt.sample_noise()
                closure(k, zero=False)
                opt.perturb()
                if event == "cancel" and k == m - 1:
                    opt.cancel_step()
                    return "failed"
                try:
                    closure(k, zero=False)
                except Injected:
                    opt.cancel_step()
                    raise
            opt.step()
    except Injected:
        if opt.in_step:                # the phase API: the caller cancels
            opt.cancel_step()
        return "failed"
    finally:
        opt._backend.prepare_update = original_update
    if event in ("inf_noisy", "nan_perturbed") and any(p.numel() > 0 for p in params):
        return "skipped"
    return "done"


def play(sc, backend, reload_backend=None):
    params, opt = build(sc, backend)
    draws = 0
    for t, event in enumerate(sc["steps"]):
        if reload_backend is not None and t == sc["reload_at"]:
            sd = opt.state_dict()
            params2, opt2 = build(sc, reload_backend)
            with torch.no_grad():
                for p, q in zip(params, params2):
                    q.copy_(p)
            opt2.load_state_dict(sd)
            params, opt = params2, opt2
        before = snapshot(opt, params) if all(p in opt.state for p in params) else None
        skipped = opt.skipped_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            outcome = run_step(opt, params, sc, event)
        m = sc["m"] if sc["driver"] != "step" else 1
        if outcome == "failed" and event == "closure_error":
            draws += 1                                   # the first sample was drawn
        else:
            draws += m
        assert not opt.in_step
        assert opt.noise_offset == draws, (opt.noise_offset, draws, event)
        if outcome in ("skipped", "failed") and before is not None:
            after = snapshot(opt, params)
            assert all(torch.equal(a, b) for a, b in zip(before, after)), (event, outcome)
        if outcome == "skipped":
            assert opt.skipped_steps == skipped + 1
    return params, opt


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(sc=scenario)
def test_every_backend_equals_reference(backend, sc):
    ref_params, ref_opt = play(sc, "reference")
    params, opt = play(sc, backend, reload_backend="reference" if sc["reload_at"] % 2 else None)
    for p, q in zip(params, ref_params):
        tol = TOL[p.dtype]
        torch.testing.assert_close(p.detach().double(), q.detach().double(), rtol=tol, atol=tol)
        for k in ("momentum", "precision"):
            if q in ref_opt.state:
                torch.testing.assert_close(opt.state[p][k].double(), ref_opt.state[q][k].double(), rtol=tol, atol=tol)
    assert opt.noise_offset == ref_opt.noise_offset and opt.skipped_steps == ref_opt.skipped_steps

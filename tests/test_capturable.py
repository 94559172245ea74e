"""capturable=True (device-side noise counter and skip, no host syncs) and tensor lr, on CPU."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, _ops
from conftest import BACKENDS
from helpers import make_data, make_model, snapshot, train

fused = pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="CPU kernels not built")


@fused
def test_capturable_equals_eager():
    a, b = make_model(), make_model()
    opt_a = BSAM(a.parameters(), lr=0.05, num_data=100, backend="cpu", seed=3)
    opt_b = BSAM(b.parameters(), lr=0.05, num_data=100, backend="cpu", seed=3, capturable=True)
    train(a, opt_a, 4)
    train(b, opt_b, 4)
    sa, sb = snapshot(a, opt_a), snapshot(b, opt_b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert opt_b.noise_offset == 4 and opt_b.state_dict()["noise"]["offset"] == 4


@fused
def test_capturable_skips_non_finite_steps_on_the_device():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cpu", seed=3, capturable=True)
    train(model, opt, 2)
    before = snapshot(model, opt)
    x, y = make_data()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.fc2.weight.grad[0, 0] = float("nan")
        return loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the device-side path does not warn
        opt.step(closure)
    after = snapshot(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.skipped_steps == 1
    train(model, opt, 1)
    assert opt.skipped_steps == 1


def test_capturable_needs_a_fused_backend():
    with pytest.raises(ValueError, match="capturable=True needs a fused backend"):
        BSAM(make_model().parameters(), lr=0.1, num_data=10, backend="foreach", capturable=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_equals_float_lr(backend):
    a, b = make_model(), make_model()
    opt_a = BSAM(a.parameters(), lr=0.05, num_data=100, backend=backend, seed=3)
    opt_b = BSAM(b.parameters(), lr=torch.tensor(0.05), num_data=100, backend=backend, seed=3)
    train(a, opt_a, 2)
    train(b, opt_b, 2)
    sa, sb = snapshot(a, opt_a), snapshot(b, opt_b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-8)
    opt_b.param_groups[0]["lr"].fill_(0.0)         # a schedule that writes the tensor in place
    w = [p.detach().clone() for p in b.parameters()]
    train(b, opt_b, 1)
    assert all(torch.equal(p.detach(), w0) for p, w0 in zip(b.parameters(), w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_rho_equals_float_rho(backend):
    a, b = make_model(), make_model()
    opt_a = BSAM(a.parameters(), lr=0.05, rho=0.07, num_data=100, backend=backend, seed=3)
    opt_b = BSAM(b.parameters(), lr=0.05, rho=torch.tensor(0.07), num_data=100, backend=backend, seed=3)
    train(a, opt_a, 2)
    train(b, opt_b, 2)
    sa, sb = snapshot(a, opt_a), snapshot(b, opt_b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="rho"):
        BSAM(make_model().parameters(), lr=0.1, num_data=10, rho=torch.tensor(-1.0))

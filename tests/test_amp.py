"""GradScaler through the phase API (CPU autocast/GradScaler here; CUDA in test_cuda)."""
import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM
from helpers import make_data, make_model, snapshot


def amp_step(model, opt, scaler, x, y, poison=None):
    opt.sample_noise()
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison == "noisy":
        model.fc1.weight.grad[0, 0] = float("inf")
    opt.perturb(grad_scaler=scaler)
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison == "perturbed":
        model.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def test_grad_scaler_unscales_both_gradients(backend):
    x, y = make_data()
    a, b = make_model(), make_model()
    opt_a = BSAM(a.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    opt_b = BSAM(b.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        amp_step(a, opt_a, scaler, x, y)
        opt_b.step(lambda: (opt_b.zero_grad(), F.cross_entropy(b(x), y).backward()))
    sa, sb = snapshot(a, opt_a), snapshot(b, opt_b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-9)


def test_overflow_leaves_state_untouched_and_backs_off(backend):
    x, y = make_data()
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    amp_step(model, opt, scaler, x, y)
    for poison in ("perturbed", "noisy"):
        before = snapshot(model, opt)
        scale = scaler.get_scale()
        amp_step(model, opt, scaler, x, y, poison=poison)
        after = snapshot(model, opt)
        assert all(torch.equal(before[k], after[k]) for k in before), poison
        assert scaler.get_scale() < scale, poison   # the scaler saw the overflow too


def test_step_after_perturb_with_scaler_unscales_without_scaler_step(backend):
    """perturb(grad_scaler=) then opt.step() (not scaler.step(opt)): the perturbed gradients
    are unscaled with the scale perturb() saw, as scaler.step(opt) would."""
    x, y = make_data()
    a, b = make_model(), make_model()
    opt_a = BSAM(a.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    opt_b = BSAM(b.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        opt_a.sample_noise()
        scaler.scale(F.cross_entropy(a(x), y)).backward()
        opt_a.perturb(grad_scaler=scaler)
        scaler.scale(F.cross_entropy(a(x), y)).backward()
        opt_a.step()
        opt_a.zero_grad()
        opt_b.step(lambda: (opt_b.zero_grad(), F.cross_entropy(b(x), y).backward()))
    sa, sb = snapshot(a, opt_a), snapshot(b, opt_b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-9)


def test_unscale_then_step_unscales_once(backend):
    """perturb(grad_scaler=), scaler.unscale_(opt) (to clip), then opt.step() or
    scaler.step(opt): the perturbed gradient is unscaled once."""
    x, y = make_data()
    ref = make_model()
    opt_ref = BSAM(ref.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    opt_ref.step(lambda: (opt_ref.zero_grad(), F.cross_entropy(ref(x), y).backward()))
    for finish in ("opt.step", "scaler.step"):
        model = make_model()
        opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        opt.sample_noise()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.perturb(grad_scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        if finish == "opt.step":
            opt.step()
        else:
            scaler.step(opt)
        scaler.update()
        a, b = snapshot(model, opt), snapshot(ref, opt_ref)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-9, msg=f"{finish}: {k}")


def test_scaler_step_with_a_closure_is_refused_clearly():
    x, y = make_data()
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))                   # a scaler in use (as accelerate's is)
    with pytest.raises(RuntimeError, match="phase API"):
        scaler.step(opt, lambda: scaler.scale(F.cross_entropy(model(x), y)).backward())
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf") and not opt.in_step

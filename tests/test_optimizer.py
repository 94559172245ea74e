"""Behaviour of BSAM: backends agree, phases, m parts, rho=0, schedulers, posterior."""
import math

import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, available_backends, split_batch
from bsam_fast.backends.reference import gradient_magnitude
from helpers import closure_for, make_data, make_model, snapshot, train


def make_opt(model, backend, **kw):
    args = dict(lr=0.05, num_data=100, rho=0.05, weight_decay=0.01, seed=1234)
    args.update(kw)
    return BSAM(model.parameters(), backend=backend, **args)


def assert_close_states(a, b, rtol, what=""):
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-30)
        dev = ((a[k] - b[k]).abs().max() / scale).item()
        assert dev <= rtol, f"{what} {k}: relative deviation {dev:.3g} > {rtol:g}"


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                        (torch.bfloat16, 2e-2)])
def test_backends_agree_with_reference(backend, dtype, rtol):
    results = {}
    for name in ("reference", backend):
        model = make_model(dtype=dtype)
        opt = make_opt(model, name)
        train(model, opt, 5, dtype=dtype)
        results[name] = snapshot(model, opt)
    assert_close_states(results[backend], results["reference"], rtol, backend)


def test_auto_backend_is_visible_and_fastest_available():
    opt = make_opt(make_model(), "auto")
    assert opt.backend == available_backends()[0]


def test_parameters_hold_the_mean_between_steps(backend):
    model = make_model()
    opt = make_opt(model, backend)
    train(model, opt, 2)
    x, y = make_data()
    opt.sample_noise()
    noisy = [p.detach().clone() for p in model.parameters()]
    opt.cancel_step()
    means = [p.detach().clone() for p in model.parameters()]
    assert any((a - b).abs().max() > 0 for a, b in zip(noisy, means))
    opt.step(closure_for(model, opt, x, y))
    for p in model.parameters():
        assert "mean" not in opt.state[p]          # fp32: the parameter is the mean
    assert opt.in_step is False


def test_phase_api_equals_closure(backend):
    x, y = make_data()
    a, b = make_model(), make_model()
    opt_a, opt_b = make_opt(a, backend), make_opt(b, backend)
    for _ in range(3):
        opt_a.step(closure_for(a, opt_a, x, y))
        opt_b.sample_noise()
        F.cross_entropy(b(x), y).backward()
        opt_b.perturb()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
        opt_b.zero_grad()
    assert_close_states(snapshot(b, opt_b), snapshot(a, opt_a), 0.0)


def test_m_parts_equal_manual_average(backend):
    """step_parts with m parts == the m-part formula computed by hand with the same noise."""
    x, y = make_data(n=12)
    m = 3
    model = make_model()
    opt = make_opt(model, backend, weight_decay=0.02)
    w0 = [p.detach().clone() for p in model.parameters()]
    noise = [[torch.randn_like(p) for p in model.parameters()] for _ in range(m)]
    parts = split_batch(x, y, m=m)

    def closure(k):
        opt.zero_grad()
        loss = F.cross_entropy(model(parts[k][0]), parts[k][1])
        loss.backward()
        return loss
    opt.step_parts(closure, m, noise=noise)

    ref = make_model()
    params = list(ref.parameters())
    N, rho, s0 = 100, 0.05, 1.0
    h_sum = [torch.zeros_like(p) for p in params]
    u_sum = [torch.zeros_like(p) for p in params]
    for k in range(m):
        with torch.no_grad():
            for p, w, xi in zip(params, w0, noise[k]):
                p.copy_(w + xi / math.sqrt(N * s0))
        ref.zero_grad()
        F.cross_entropy(ref(parts[k][0]), parts[k][1]).backward()
        g = [p.grad.clone() for p in params]
        with torch.no_grad():
            for p, w, gk, u in zip(params, w0, g, u_sum):
                u += gradient_magnitude(torch.full_like(p, s0), gk)
                p.copy_(w + rho * gk / s0)
        ref.zero_grad()
        F.cross_entropy(ref(parts[k][0]), parts[k][1]).backward()
        for hs, p in zip(h_sum, params):
            hs += p.grad
    for (name, p), w, hs, u in zip(model.named_parameters(), w0, h_sum, u_sum):
        gm = 0.1 * (hs / m + 0.02 * w)
        torch.testing.assert_close(opt.state[p]["momentum"], gm, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach(), w - 0.05 * gm / s0, rtol=1e-5, atol=1e-7)
        s_new = 0.999 * s0 + 0.001 * (u / m + 0.1 + 0.02)
        torch.testing.assert_close(opt.state[p]["precision"], s_new, rtol=1e-6, atol=1e-7)


def test_m1_step_parts_equals_step(backend):
    x, y = make_data()
    a, b = make_model(), make_model()
    opt_a, opt_b = make_opt(a, backend), make_opt(b, backend)
    opt_a.step(closure_for(a, opt_a, x, y))
    closure = closure_for(b, opt_b, x, y)
    opt_b.step_parts(lambda k: closure(), 1)
    assert_close_states(snapshot(b, opt_b), snapshot(a, opt_a), 0.0)


def test_rho_zero_is_the_adam_like_update_without_sam(backend):
    """rho = 0: the second gradient is taken at the mean itself."""
    x, y = make_data()
    model = make_model()
    opt = make_opt(model, backend, rho=0.0, weight_decay=0.0, damping=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    noise = [torch.randn_like(p) for p in model.parameters()]
    opt.step(closure_for(model, opt, x, y), noise=noise)

    ref = make_model()
    F.cross_entropy(ref(x), y).backward()
    grad_at_mean = [p.grad.clone() for p in ref.parameters()]
    ref.zero_grad()
    with torch.no_grad():
        for p, xi in zip(ref.parameters(), noise):
            p.add_(xi / math.sqrt(100.0))
    F.cross_entropy(ref(x), y).backward()
    grad_at_noise = [p.grad.clone() for p in ref.parameters()]
    for p, w, g, gn in zip(model.parameters(), w0, grad_at_mean, grad_at_noise):
        torch.testing.assert_close(p.detach(), w - 0.05 * 0.1 * g, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(opt.state[p]["precision"],
                                   0.999 + 0.001 * (gn.abs() + 0.1), rtol=1e-6, atol=1e-8)


def test_parameters_without_grad_are_skipped(backend):
    model = make_model()
    opt = make_opt(model, backend)
    model.scale.requires_grad_(False)
    before = model.scale.detach().clone()
    train(model, opt, 2)
    assert torch.equal(model.scale.detach(), before)
    assert model.scale not in opt.state           # frozen: not part of the posterior
    assert opt.state[model.fc1.weight]["momentum"].abs().sum() > 0


def test_lr_scheduler_drives_the_step(backend):
    x, y = make_data()
    model = make_model()
    opt = make_opt(model, backend, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == [0.1, 0.05, 0.025]
    assert opt.param_groups[0]["lr"] == 0.0125


def test_lr_schedule_changes_the_update(backend):
    x, y = make_data()
    a, b = make_model(), make_model()
    opt_a, opt_b = make_opt(a, backend, lr=0.1), make_opt(b, backend, lr=0.1)
    opt_b.param_groups[0]["lr"] = 0.0
    w = [p.detach().clone() for p in b.parameters()]
    opt_a.step(closure_for(a, opt_a, x, y))
    opt_b.step(closure_for(b, opt_b, x, y))
    assert all(torch.equal(p.detach(), w0) for p, w0 in zip(b.parameters(), w))
    assert any(not torch.equal(p.detach(), w0) for p, w0 in zip(a.parameters(), w))


def test_param_groups_with_own_hyperparameters(backend):
    model = make_model()
    opt = BSAM([{"params": model.conv.parameters(), "lr": 0.0},
                {"params": list(model.fc1.parameters()) + list(model.fc2.parameters())
                 + [model.scale]}],
               lr=0.05, num_data=100, backend=backend, seed=3)
    w = model.conv.weight.detach().clone()
    train(model, opt, 2)
    assert torch.equal(model.conv.weight.detach(), w)
    assert opt.state[model.conv.weight]["precision"].ne(1).any()   # s still learns


def test_named_parameters():
    model = make_model()
    opt = BSAM(model.named_parameters(), lr=0.01, num_data=10)
    train(model, opt, 1)
    names = [n for n, _ in model.named_parameters()]
    assert opt.state_dict()["param_groups"][0]["param_names"] == names


def test_posterior_std_and_sample(backend):
    model = make_model()
    opt = make_opt(model, backend, num_data=400)
    for std in opt.posterior_std():
        torch.testing.assert_close(std, torch.full_like(std, 1 / 20.0))
    train(model, opt, 2)
    stds = opt.posterior_std()
    for p, std in zip(model.parameters(), stds):
        torch.testing.assert_close(std, torch.rsqrt(400 * opt.state[p]["precision"]))
    means = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    with opt.sampled_params(generator=g):
        diffs = [((p - w) / s).flatten() for p, w, s in zip(model.parameters(), means, stds)]
    z = torch.cat(diffs)
    assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.3
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), means))
    with pytest.raises(KeyError):
        with opt.sampled_params():
            raise KeyError("boom")
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), means))


def test_closure_exception_restores_the_mean(backend):
    model = make_model()
    opt = make_opt(model, backend)
    train(model, opt, 1)
    before = snapshot(model, opt)
    offset = opt.noise_offset

    def bad_closure():
        raise ValueError("closure failed")
    with pytest.raises(ValueError, match="closure failed"):
        opt.step(bad_closure)
    assert_close_states(snapshot(model, opt), before, 0.0)
    assert opt.noise_offset == offset + 1 and not opt.in_step


def test_torch_manual_seed_reproduces_a_run():
    runs = []
    for _ in range(2):
        model = make_model()                   # (make_model seeds torch itself)
        torch.manual_seed(42)
        opt = BSAM(model.parameters(), lr=0.05, num_data=100)
        train(model, opt, 3)
        runs.append(snapshot(model, opt))
    assert_close_states(runs[0], runs[1], 0.0)
    model = make_model()
    torch.manual_seed(43)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100)
    train(model, opt, 3)
    assert snapshot(model, opt)["fc1.weight"].ne(runs[0]["fc1.weight"]).any()


def test_noise_comes_from_the_stream(backend):
    """The sample is w + xi/sqrt(N s) with xi the stream's numbers at (seed, offset)."""
    from bsam_fast.noise import noise_bases, normal_like
    model = make_model()
    opt = make_opt(model, backend, num_data=25)
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    opt.sample_noise()
    xi = normal_like(params, noise_bases([p.numel() for p in params]), 1234, 0)
    for p, w0, z in zip(params, w, xi):
        torch.testing.assert_close(p.detach(), w0 + z / 5.0, rtol=1e-6, atol=1e-7)
    opt.cancel_step()
    assert opt.noise_offset == 1


def test_phase_api_m_parts_accumulate_in_grad(backend):
    """Phase API with m parts: perturb() hands back the running sum of the perturbed
    gradients as .grad, so plain backward() calls accumulate them (what DDP reduces)."""
    x, y = make_data(n=12)
    parts = split_batch(x, y, m=3)
    a, b = make_model(), make_model()
    opt_a, opt_b = make_opt(a, backend), make_opt(b, backend)

    def closure(k):
        opt_a.zero_grad()
        loss = F.cross_entropy(a(parts[k][0]), parts[k][1])
        loss.backward()
        return loss
    opt_a.step_parts(closure, 3)
    for k, (xk, yk) in enumerate(parts):
        opt_b.sample_noise()
        F.cross_entropy(b(xk), yk).backward()
        opt_b.perturb()
        if k == 0:
            assert all(p.grad is None for p in b.parameters())
        else:
            assert all(p.grad is not None for p in b.parameters())
        F.cross_entropy(b(xk), yk).backward()
    opt_b.step()
    assert_close_states(snapshot(b, opt_b), snapshot(a, opt_a), 1e-6)

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


@fused
def test_capturable_counters_exist_from_the_start():
    """The device noise counter is made at construction (not inside a graph capture), and a
    state_dict load moves it."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cpu", seed=3, capturable=True)
    assert list(opt._state.device_offset) == [torch.device("cpu")]
    assert opt._state.device_skipped is not None and opt.skipped_steps == 0
    train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["noise"]["offset"] == 2
    sd["noise"]["offset"] = 7
    opt.load_state_dict(sd)
    assert opt.noise_offset == 7 and int(opt._state.device_offset[torch.device("cpu")]) == 7


@fused
def test_device_side_skip_is_all_or_nothing_and_counted_once():
    """A non-finite gradient in one bucket (fp64 group) skips every bucket (fp32 group too),
    and the step is counted once."""
    torch.manual_seed(0)
    a32 = torch.nn.Parameter(torch.randn(5))
    a64 = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = BSAM([{"params": [a32]}, {"params": [a64]}], lr=0.1, num_data=10, backend="cpu", seed=0,
               capturable=True)

    def closure(poison):
        def run():
            opt.zero_grad()
            (a32.sum() + (a64 ** 2).sum()).backward()
            if poison:
                a64.grad[2] = float("nan")
        return run
    opt.step(closure(False))
    before = [a32.detach().clone(), a64.detach().clone()] + [v.clone() for p in (a32, a64)
                                                              for v in opt.state[p].values()]
    opt.step(closure(True))
    after = [a32.detach(), a64.detach()] + [v for p in (a32, a64) for v in opt.state[p].values()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert opt.skipped_steps == 1


@pytest.mark.skipif(not (torch.cuda.device_count() >= 2 and _ops.has_kernel("cuda")), reason="needs two GPUs")
def test_device_side_skip_spans_devices():
    p0 = torch.nn.Parameter(torch.randn(5, device="cuda:0"))
    p1 = torch.nn.Parameter(torch.randn(5, device="cuda:1"))
    opt = BSAM([p0, p1], lr=0.1, num_data=10, backend="cuda", seed=0, capturable=True)
    w1 = p1.detach().clone()

    def closure():
        opt.zero_grad()
        (p0.sum() + p1.sum()).backward()
        p0.grad[0] = float("inf")
    opt.step(closure)
    assert torch.equal(p1.detach(), w1) and opt.skipped_steps == 1


@fused
def test_tensor_grad_factor_is_read_in_float64():
    """A float64 factor tensor gives what the float argument gives (float64 parameters)."""
    from bsam_fast import _ops
    shapes = [(5,), (3, 3)]
    make = lambda seed, pos=False: [(torch.randn(s, generator=torch.Generator().manual_seed(seed + i),
                                                  dtype=torch.float64).abs() + 0.5) if pos else
                                    torch.randn(s, generator=torch.Generator().manual_seed(seed + i),
                                                dtype=torch.float64) for i, s in enumerate(shapes)]
    out = []
    for factor in (1 / 3, torch.tensor(1 / 3, dtype=torch.float64)):
        p, w, gm, s, g, u = make(1), make(2), make(3), make(4, True), make(5), make(6, True)
        _ops.update_(p, w, gm, s, g, u, factor, 1.0, 0.1, 0.9, 0.999, 0.0, 0.1, True)
        out.append(p + gm + s)
    assert all(torch.equal(a, b) for a, b in zip(*out))

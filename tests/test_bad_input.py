"""Bad input gets a clear error naming the problem and never corrupts state."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, split_batch
from helpers import make_data, make_model, snapshot, train


def params():
    return [torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-0.1), "lr"), (dict(num_data=0), "num_data"), (dict(num_data=-5), "num_data"),
    (dict(rho=-0.01), "rho"), (dict(betas=(1.0, 0.999)), "beta1"),
    (dict(betas=(0.9, -0.1)), "beta2"), (dict(betas=(0.9,)), "betas"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(damping=-0.1), "damping"),
    (dict(s_init=0.0), "s_init"), (dict(backend="gpu-magic"), "backend"),
    (dict(lr=float("nan")), "lr"), (dict(seed=-1), "seed"),
])
def test_invalid_hyperparameter_names_the_argument(kwargs, name):
    args = dict(lr=0.1, num_data=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        BSAM(params(), **args)


def test_invalid_param_group_hyperparameter():
    opt = BSAM(params(), lr=0.1, num_data=10)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": params(), "rho": -1.0})


@pytest.mark.parametrize("m", [0, -1, 1.5, True])
def test_invalid_m(m):
    with pytest.raises(ValueError, match="m"):
        split_batch(torch.zeros(4), m=m)
    opt = BSAM(params(), lr=0.1, num_data=10)
    with pytest.raises(ValueError, match="m"):
        opt.step_parts(lambda k: None, m)


def test_batch_not_divisible_into_m_parts():
    with pytest.raises(ValueError, match="not divisible into m=3"):
        split_batch(torch.zeros(10, 2), torch.zeros(10), m=3)


def test_complex_and_integer_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        BSAM([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], lr=0.1, num_data=1)
    with pytest.raises(ValueError, match="floating-point"):
        BSAM([torch.zeros(2, dtype=torch.int64)], lr=0.1, num_data=1)


def test_sparse_gradient_is_refused_and_leaves_the_mean(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = BSAM(emb.parameters(), lr=0.1, num_data=10, backend=backend)
    w = emb.weight.detach().clone()
    opt.sample_noise()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.perturb()
    assert torch.equal(emb.weight.detach(), w) and not opt.in_step


def test_phase_order_is_enforced():
    opt = BSAM(params(), lr=0.1, num_data=10)
    with pytest.raises(RuntimeError, match="perturb"):
        opt.perturb()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    opt.sample_noise()
    with pytest.raises(RuntimeError, match="twice"):
        opt.sample_noise()
    with pytest.raises(RuntimeError, match="unfinished"):
        opt.state_dict()
    opt.cancel_step()


def test_bad_noise_is_refused_before_anything_changes(backend):
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.1, num_data=10, backend=backend)
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="expected 7 tensors"):
        opt.sample_noise([torch.zeros(1)])
    bad = [torch.zeros_like(p) for p in model.parameters()]
    bad[2] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"noise\[2\]"):
        opt.sample_noise(bad)
    assert opt.noise_offset == 0 and not opt.in_step
    assert all(torch.equal(p.detach(), w0) for p, w0 in zip(model.parameters(), w))


@pytest.mark.parametrize("where", ["noisy", "perturbed"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_step(backend, where, value):
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.1, num_data=10, backend=backend, seed=5)
    train(model, opt, 2)
    before = snapshot(model, opt)
    offset = opt.noise_offset
    x, y = make_data()
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        if (where == "noisy") == (len(calls) == 1):
            model.fc1.weight.grad[0, 0] = value
        return loss
    with pytest.warns(RuntimeWarning, match=f"{where} gradient holds inf or NaN"):
        opt.step(closure)
    after = snapshot(model, opt)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert opt.skipped_steps == 1
    assert opt.noise_offset == offset + 1          # the draw was taken (documented)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 1)                       # and training goes on normally
    assert opt.skipped_steps == 1


def test_non_finite_in_one_part_skips_an_m_part_step(backend):
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.1, num_data=10, backend=backend)
    train(model, opt, 1)
    before = snapshot(model, opt)
    x, y = make_data(n=8)
    parts = split_batch(x, y, m=2)

    def closure(k):
        opt.zero_grad()
        loss = F.cross_entropy(model(parts[k][0]), parts[k][1])
        loss.backward()
        if k == 0:
            model.conv.bias.grad.fill_(float("nan"))
        return loss
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step_parts(closure, 2)
    after = snapshot(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_parameter_put_into_param_groups_directly_is_refused_naming_add_param_group(backend):
    """A parameter swapped into ``param_groups`` by hand has no place in the noise stream
    (add_param_group gives one): the step is refused, before anything changes."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = BSAM(model.parameters(), lr=0.1, num_data=10, backend=backend)
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    model.weight = torch.nn.Parameter(torch.zeros(2, 3))
    opt.param_groups[0]["params"][0] = model.weight
    bias = model.bias.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*add_param_group"):
        opt.step(closure)
    assert torch.equal(model.bias, bias) and torch.equal(model.weight, torch.zeros(2, 3)) and not opt.in_step

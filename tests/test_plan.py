"""The cached step plan: every change it depends on is seen, and a step with a plan kept
across steps equals one of a freshly built optimizer, bit for bit, for every driver; the
Python work of a step does not grow with the number of tensors."""
import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bsam_fast import BSAM, _ops, split_batch
from helpers import make_data, make_model, train


def _drive(driver, model, opt, seed):
    x, y = make_data(seed, n=8)
    if driver in ("closure", "capturable"):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    elif driver == "parts":
        parts = split_batch(x, y, m=2)

        def part(k):
            opt.zero_grad()
            F.cross_entropy(model(parts[k][0]), parts[k][1]).backward()
        opt.step_parts(part, 2)
    elif driver == "scaler":               # the phase API under a GradScaler
        scaler = opt.__dict__.setdefault("_test_scaler", torch.amp.GradScaler("cpu", init_scale=16.0))
        opt.zero_grad()
        opt.sample_noise()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.perturb(grad_scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    else:                                  # the phase API
        opt.zero_grad()
        opt.sample_noise()
        F.cross_entropy(model(x), y).backward()
        opt.perturb()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _state(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for _, v in sorted(opt.state.get(p, {}).items())]
    return out


def _freeze(model, opt):
    model.fc1.bias.requires_grad_(False)


def _unfreeze(model, opt):
    model.fc1.bias.requires_grad_(True)


def _replace_storage(model, opt):
    model.fc2.weight.data = model.fc2.weight.data.clone()


def _add_group(model, opt):
    extra = nn.Parameter(torch.linspace(-1, 1, 6))
    model.extra = extra            # joins the loss below through the forward's parameters
    opt.add_param_group({"params": [extra], "lr": 0.03})


def _load_back(model, opt):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


CHANGES = {"requires_grad off": [_freeze], "requires_grad off and on": [_freeze, _unfreeze],
           "storage replaced": [_replace_storage], "add_param_group": [_add_group],
           "load_state_dict": [_load_back]}


class WithExtra(nn.Module):
    """make_model()'s net, plus whatever parameter a test adds (it joins the output)."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        out = self.net(x)
        extra = getattr(self, "extra", None)
        return out if extra is None else out + extra.sum() * 1e-2


@pytest.mark.parametrize("driver", ["closure", "parts", "phases", "scaler", "capturable"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_kept_plan_after_a_change_equals_a_fresh_optimizer(backend, driver, change):
    if driver == "capturable" and backend != "cpu":
        pytest.skip("capturable=True needs a fused backend")
    capturable = driver == "capturable"
    model = WithExtra()
    opt = BSAM(model.parameters(), lr=0.05, num_data=64, backend=backend, seed=9, capturable=capturable)
    for t in range(2):
        _drive(driver, model, opt, seed=t)          # the plan is built and kept
    for fn in CHANGES[change]:
        fn(model.net if fn in (_freeze, _unfreeze, _replace_storage) else model, opt)
    # A fresh optimizer on a copy of the model, from the same state.
    fresh_model = copy.deepcopy(model)
    fresh_params = dict(fresh_model.named_parameters())
    fresh_groups = [{**g, "params": [fresh_params[n] for n in _names(model, g["params"])]}
                    for g in opt.param_groups]
    fresh = BSAM(fresh_groups, lr=0.05, num_data=64, backend=backend, seed=9, capturable=capturable)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(2, 5):
        _drive(driver, model, opt, seed=t)
        _drive(driver, fresh_model, fresh, seed=t)
    for a, b in zip(_state(model, opt), _state(fresh_model, fresh)):
        assert torch.equal(a, b)
    assert opt.noise_offset == fresh.noise_offset


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_a_model_converted_after_construction_gets_state_of_its_new_dtype(backend):
    """.to(float64) before the first step: the plan (and state) follow the parameters."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=64, backend=backend, seed=2)
    model.double()
    train(model, opt, 2, dtype=torch.float64)
    fresh_model = make_model().double()
    fresh = BSAM(fresh_model.parameters(), lr=0.05, num_data=64, backend=backend, seed=2)
    train(fresh_model, fresh, 2, dtype=torch.float64)
    for a, b in zip(_state(model, opt), _state(fresh_model, fresh)):
        assert a.dtype == torch.float64 and torch.equal(a, b)


# ------------------------------------------------------------------ host work per step
def _python_calls(fn) -> int:
    """Python-level function calls (profile 'call' events) made while fn() runs."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _calls_per_step(n_tensors: int) -> int:
    params = [nn.Parameter(torch.randn(16)) for _ in range(n_tensors)]
    grads = [torch.randn(16) for _ in params]
    opt = BSAM(params, lr=1e-3, num_data=100, backend="cpu", seed=0)

    def put():
        for p, g in zip(params, grads):
            p.grad = g.clone()
    total = 0
    for step in range(3):                   # the first builds the plan
        opt.zero_grad()
        calls = _python_calls(opt.sample_noise)
        put()
        calls += _python_calls(opt.perturb)
        put()
        calls += _python_calls(opt.step)
        total = calls
    return total


@pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="CPU kernels not built")
def test_python_calls_per_step_do_not_grow_with_the_number_of_tensors():
    few, many = _calls_per_step(86), _calls_per_step(400)
    assert many <= 1.2 * few, (few, many)
    assert few < 400                          # a few hundred calls, not thousands


def test_state_moved_by_assignment_is_seen(backend):
    """The offload idiom `opt.state[p][k] = v.to(...)` between steps: the plan follows."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=64, backend=backend, seed=2)
    train(model, opt, 2)
    for st in opt.state.values():
        for k, v in st.items():
            st[k] = v.clone()
    before = {k: v.clone() for k, v in opt.state[model.fc1.weight].items()}
    train(model, opt, 1)
    assert not torch.equal(before["precision"], opt.state[model.fc1.weight]["precision"])


def test_loading_twice_keeps_one_state_dict_hook():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=64, seed=2)
    train(model, opt, 1)
    for _ in range(2):
        opt.load_state_dict(opt.state_dict())
    assert len(opt._optimizer_state_dict_post_hooks) == 1


def test_a_failure_in_the_first_sample_leaves_the_parameters_at_the_mean(monkeypatch):
    """Two groups; the second group's sample fails: the first group's noise is undone."""
    model = make_model()
    groups = [{"params": [model.fc1.weight, model.fc1.bias]},
              {"params": [p for n, p in model.named_parameters() if not n.startswith("fc1")]}]
    opt = BSAM(groups, lr=0.05, num_data=64, backend="reference", seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    real, calls = opt._backend.sample, []

    def failing(b, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(b, *args, **kwargs)
    monkeypatch.setattr(opt._backend, "sample", failing)
    with pytest.raises(RuntimeError, match="injected"):
        opt.sample_noise()
    assert not opt.in_step and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

"""Reliability: valid input never crashes, invalid input is refused before anything changes,
and a failure inside a step leaves the optimizer as it was (one test per reported case)."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from bsam_fast import BSAM
from conftest import BACKENDS
from helpers import make_model, snapshot, train

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def everything(opt, params):
    """Parameters and every state tensor, as float64 copies, plus the counters."""
    out = [p.detach().double().clone() for p in params]
    for p in params:
        out += [v.double().clone() for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
    return out, opt.noise_offset, opt.skipped_steps, opt.in_step


def same(a, b):
    (ta, *ca), (tb, *cb) = a, b
    return ca == cb and len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def quadratic_step(opt, params, poison=None):
    def closure():
        opt.zero_grad()
        sum((p.float() ** 2).sum() * (i + 1) for i, p in enumerate(params)).backward()
        if poison is not None:
            poison()
    return opt.step(closure)


# 1 ---------------------------------------------------------------- mixed dtypes in one group
@pytest.mark.parametrize("dtypes", list(itertools.combinations(DTYPES, 2)), ids=str)
def test_mixed_dtypes_in_one_group(backend, dtypes):
    results = []
    for b in (backend, "reference"):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(5, dtype=d)) for d in dtypes] + [nn.Parameter(torch.randn((), dtype=dtypes[0]))]
        opt = BSAM(params, lr=0.1, num_data=10, backend=b, seed=0)
        for _ in range(2):
            quadratic_step(opt, params)
        results.append(everything(opt, params)[0])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-2, atol=1e-2)


# 2 ---------------------------------------------------------------- lr, rho of shape (1,)
def test_lr_and_rho_as_one_element_tensors(backend):
    results = []
    for lr, rho in ((0.1, 0.05), (torch.tensor([0.1]), torch.tensor([0.05]))):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(())), nn.Parameter(torch.randn(4, 3))]   # 0-dim too
        opt = BSAM(params, lr=lr, rho=rho, num_data=10, backend=backend, seed=0)
        for _ in range(2):
            quadratic_step(opt, params)
        results.append(everything(opt, params)[0])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# 3 ---------------------------------------------------------------- failures roll back
@pytest.mark.parametrize("where", ["prepare_update", "check_finite", "closure"])
def test_an_error_inside_a_step_changes_nothing(backend, where, monkeypatch):
    """Two buckets (fp32, fp64): an error while the second bucket's update is prepared
    leaves the first bucket unwritten too."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = BSAM(params, lr=0.1, num_data=10, backend=backend, seed=0)
    quadratic_step(opt, params)
    before = everything(opt, params)
    calls = []
    real = getattr(opt._backend, where) if where != "closure" else None

    def boom(*args, **kwargs):
        calls.append(1)
        if where == "closure" or len(calls) == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)
    if where == "closure":
        with pytest.raises(RuntimeError, match="injected"):
            quadratic_step(opt, params, poison=boom)
    else:
        monkeypatch.setattr(opt._backend, where, boom)
        with pytest.raises(RuntimeError, match="injected"):
            quadratic_step(opt, params)
        monkeypatch.undo()
    after = everything(opt, params)
    assert same((before[0], before[2], before[3]), (after[0], after[2], after[3]))
    quadratic_step(opt, params)                   # and the optimizer goes on working
    assert not opt.in_step


# 4 ---------------------------------------------------------------- unusual gradients
@pytest.mark.parametrize("kind", ["transposed", "float64"])
def test_unusual_gradients_give_one_result_on_every_backend(kind):
    results = []
    for b in BACKENDS:
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(4, 3))
        if kind == "float64" and hasattr(w, "grad_dtype"):
            w.grad_dtype = None          # torch >= 2.10 refuses other grad dtypes unless told
        opt = BSAM([w], lr=0.1, num_data=10, backend=b, seed=0)

        def closure():
            opt.zero_grad()
            g = (torch.arange(12.0).reshape(3, 4) + w.detach().t()).t() if kind == "transposed" else \
                (w.detach().double() * 3 + 1)
            w.grad = g
            assert kind != "transposed" or not w.grad.is_contiguous()
        for _ in range(2):
            opt.step(closure)
        results.append(everything(opt, [w])[0])
    for r in results[1:]:
        for a, b in zip(results[0], r):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# 5 ---------------------------------------------------------------- duplicates
def test_a_parameter_listed_twice_is_refused():
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="appears twice"):
        BSAM([p, p], lr=0.0, rho=0.0, num_data=10)
    q = nn.Parameter(torch.ones(2))
    opt = BSAM([q], lr=0.1, num_data=10)
    r = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [r, r]})
    assert len(opt.param_groups) == 1                 # the refused group is not kept


# 6 ---------------------------------------------------------------- state_dict validation
def _trained(backend="reference", dtype=torch.float32):
    model = make_model(dtype=dtype)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    train(model, opt, 2, dtype=dtype)
    return model, opt


def _corrupt(sd, how):
    st = sd["state"]
    if how == "swapped":
        st[0], st[2] = st[2], st[0]
    elif how == "wrong_shape":
        st[0]["momentum"] = torch.zeros(5)
    elif how == "no_precision":
        del st[1]["precision"]
    elif how == "no_momentum":
        del st[1]["momentum"]
    elif how == "nan_precision":
        st[1]["precision"][0] = float("nan")
    elif how == "negative_precision":
        st[1]["precision"][0] = -1.0
    elif how == "negative_offset":
        sd["noise"]["offset"] = -3
    elif how == "huge_seed":
        sd["noise"]["seed"] = 2 ** 70
    elif how == "adam":
        adam = torch.optim.Adam(make_model().parameters()).state_dict()
        adam["noise"] = sd["noise"]
        return adam
    elif how == "inf_lr":
        sd["param_groups"][0]["lr"] = math.inf
    return sd


@pytest.mark.parametrize("how", ["swapped", "wrong_shape", "no_precision", "no_momentum", "nan_precision",
                                 "negative_precision", "negative_offset", "huge_seed", "adam", "inf_lr"])
def test_a_bad_state_dict_is_refused_and_changes_nothing(how):
    model, opt = _trained()
    good = opt.state_dict()
    import copy
    bad = _corrupt(copy.deepcopy(good), how)
    before = snapshot(model, opt), opt.noise_offset, opt.noise_seed, [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    after = snapshot(model, opt), opt.noise_offset, opt.noise_seed, [dict(g) for g in opt.param_groups]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:3] == after[1:3]
    assert [{k: v for k, v in g.items() if k != "params"} for g in before[3]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in after[3]]
    opt.load_state_dict(good)                         # the good one still loads
    train(model, opt, 1)


# 7, 8 ------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize("name,value", [("lr", math.inf), ("lr", math.nan), ("weight_decay", math.inf),
                                        ("damping", math.inf), ("s_init", math.inf), ("num_data", math.inf),
                                        ("rho", math.inf), ("rho", torch.tensor([math.inf]))])
def test_non_finite_hyperparameters_are_refused(name, value):
    kwargs = dict(lr=0.1, num_data=10)
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        BSAM([nn.Parameter(torch.ones(2))], **kwargs)
    opt = BSAM([nn.Parameter(torch.ones(2))], lr=0.1, num_data=10)
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], name: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_hyperparameters_written_after_construction_are_checked_at_the_next_step(backend, value):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5))]
    opt = BSAM(params, lr=0.1, num_data=10, backend=backend, seed=0)
    quadratic_step(opt, params)
    before = everything(opt, params)
    opt.param_groups[0]["lr"] = value                  # a scheduler or a user
    with pytest.raises(ValueError, match="lr"):
        quadratic_step(opt, params)
    assert same(before, everything(opt, params))
    opt.param_groups[0]["lr"] = 0.1
    quadratic_step(opt, params)


# 9 ---------------------------------------------------------------- stride-0 parameters
def test_an_expanded_parameter_is_refused():
    p = nn.Parameter(torch.ones(1, 3).expand(4, 3))
    with pytest.raises(ValueError, match="share memory"):
        BSAM([p], lr=0.1, num_data=10)


def test_only_lr_and_rho_may_be_tensors():
    with pytest.raises(ValueError, match="only lr and rho"):
        BSAM([nn.Parameter(torch.ones(2))], lr=0.1, num_data=torch.tensor(10.0))


def test_noise_layout_of_a_group_added_through_a_wrapper():
    """A group added through a copy of the optimizer's __dict__ (Lightning's wrapper) still
    continues the noise stream after the earlier groups."""
    a, b, c = (nn.Parameter(torch.ones(5)) for _ in range(3))
    opt = BSAM([a], lr=0.1, num_data=10)
    wrapper = object.__new__(BSAM)            # what LightningOptimizer does: share __dict__'s values
    wrapper.__dict__.update(opt.__dict__)
    wrapper.add_param_group({"params": [b]})
    opt.add_param_group({"params": [c]})
    assert opt._noise_base[a] == 0 and opt._noise_base[b] == 8 and opt._noise_base[c] == 16

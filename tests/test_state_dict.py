"""Checkpoints: round trips across backends and across processes, bit for bit."""
import subprocess
import sys
import textwrap

import pytest
import torch

from bsam_fast import BSAM, available_backends
from helpers import make_model, snapshot, train


def make(backend, dtype=torch.float32):
    model = make_model(dtype=dtype)
    return model, BSAM(model.parameters(), lr=0.05, num_data=100, rho=0.05,
                       weight_decay=0.01, backend=backend, seed=99)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_equals_uninterrupted(backend, tmp_path):
    model, opt = make(backend)
    train(model, opt, 10)
    full = snapshot(model, opt)

    model, opt = make(backend)
    train(model, opt, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    model, opt = make(backend)
    ck = torch.load(tmp_path / "ck.pt")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    assert opt.noise_offset == 5 * 1
    train(model, opt, 5, seed=6)
    assert_identical(snapshot(model, opt), full)


def test_bf16_state_stays_fp32_through_a_checkpoint(backend):
    model, opt = make(backend, torch.bfloat16)
    train(model, opt, 2, dtype=torch.bfloat16)
    sd = opt.state_dict()
    model2, opt2 = make(backend, torch.bfloat16)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("mean", "momentum", "precision"):
            assert opt2.state[p2][key].dtype == torch.float32
            assert torch.equal(opt2.state[p2][key], opt.state[p][key])


def test_state_dict_moves_between_backends():
    backends = available_backends()
    model, opt = make(backends[-1])
    train(model, opt, 3)
    for other in backends:
        model2, opt2 = make(other)
        model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(opt.state_dict())
        assert opt2.backend == other
        assert_identical(snapshot(model2, opt2), snapshot(model, opt))
        assert opt2.noise_offset == opt.noise_offset


def test_load_refuses_a_foreign_state_dict():
    model, opt = make("foreach")
    import pytest
    with pytest.raises(ValueError, match="not a BSAM state_dict"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import make_model, train, snapshot
    from bsam_fast import BSAM
    backend, mode, path = sys.argv[1:4]
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, rho=0.05, weight_decay=0.01,
               backend=backend, seed=99)
    if mode == "first":
        train(model, opt, 5)
        torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, path)
    else:
        ck = torch.load(path)
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
        train(model, opt, 5, seed=6)
        torch.save(snapshot(model, opt), path + ".final")
""")


def test_resume_in_a_new_process(backend, tmp_path):
    import pathlib
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    path = str(tmp_path / "ck.pt")
    for mode in ("first", "second"):
        subprocess.run([sys.executable, str(script), backend, mode, path], check=True)
    model, opt = make(backend)
    train(model, opt, 10)
    assert_identical(torch.load(path + ".final"), snapshot(model, opt))


def test_state_is_made_when_the_parameters_join(backend):
    """So that checkpoint loaders (torch.distributed.checkpoint) find tensors to load into;
    until the first step it follows the parameters (a model loaded after the optimizer)."""
    model = make_model(dtype=torch.bfloat16)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    assert all({"momentum", "precision", "mean"} <= opt.state[p].keys() for p in model.parameters())
    _shift(model)                                    # e.g. model.load_state_dict(...)
    opt.param_groups[0]["s_init"] = 2.0
    _assert_trains_like_one_made_now(model, opt, backend, s_init=2.0)


def _shift(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def _assert_trains_like_one_made_now(model, opt, backend, s_init):
    """Two steps of (model, opt) equal those of a bf16 model shifted by 1 and a BSAM made
    for it with this s_init."""
    reference = make_model(dtype=torch.bfloat16)
    _shift(reference)
    ref_opt = BSAM(reference.parameters(), lr=0.05, num_data=100, backend=backend, seed=1, s_init=s_init)
    train(model, opt, 2, dtype=torch.bfloat16)
    train(reference, ref_opt, 2, dtype=torch.bfloat16)
    assert_identical(snapshot(model, opt), snapshot(reference, ref_opt))


def test_stream_position_survives_tools_that_keep_only_state_and_groups(backend):
    """torch.distributed.checkpoint.state_dict keeps only 'state' and 'param_groups'."""
    import copy
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    model, opt = make(backend)
    train(model, opt, 3)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert set(saved) == {"state", "param_groups"}
    weights = copy.deepcopy(model.state_dict())
    train(model, opt, 2, seed=7)

    model2, opt2 = make(backend)
    model2.load_state_dict(weights)
    set_optimizer_state_dict(model2, opt2, saved)
    assert opt2.noise_offset == 3 and "bsam_stream" not in opt2.param_groups[0]
    train(model2, opt2, 2, seed=7)
    assert_identical(snapshot(model2, opt2), snapshot(model, opt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_model_may_be_converted_after_the_optimizer_is_made(backend, dtype):
    """The state made when the parameters joined is made again at the first step."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    model.to(dtype)
    reference = make_model(dtype=dtype)
    ref_opt = BSAM(reference.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    train(model, opt, 2, dtype=dtype)
    train(reference, ref_opt, 2, dtype=dtype)
    assert_identical(snapshot(model, opt), snapshot(reference, ref_opt))


def test_a_state_dict_taken_before_the_first_step_stays_initial(backend):
    """E.g. accelerate.prepare round-trips the state: weights loaded after it must count."""
    model = make_model(dtype=torch.bfloat16)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=1)
    opt.load_state_dict(opt.state_dict())
    _shift(model)
    opt.param_groups[0]["s_init"] = 4.0
    assert all(torch.allclose(std, torch.full_like(std, (100 * 4.0) ** -0.5)) for std in opt.posterior_std())
    _assert_trains_like_one_made_now(model, opt, backend, s_init=4.0)

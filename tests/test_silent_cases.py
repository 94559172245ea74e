"""Never silently wrong, round two: what a user can do by habit that used to give a broken
optimizer, a wrong step or wrong numbers without a word. One test per case."""
import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bsam_fast import BSAM, split_batch
from bsam_fast.predict import predict_bma
from helpers import amp_parts, make_data, make_model


def _quadratic(params):
    return sum((p ** 2).sum() * (i + 1) for i, p in enumerate(params))


def _steps(params, opt, n=3):
    for _ in range(n):
        opt.step(lambda: (opt.zero_grad(), _quadratic(params).backward()))


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(backend, how):
    params = [nn.Parameter(torch.linspace(-1, 1, 5)), nn.Parameter(torch.ones(3, 2))]
    opt = BSAM(params, lr=0.05, num_data=10, backend=backend, seed=4)
    _steps(params, opt, 2)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt), buffer)
        buffer.seek(0)
        params2, opt2 = torch.load(buffer, weights_only=False)
    assert opt2.param_groups[0]["params"][0] is params2[0]
    _steps(params, opt)
    _steps(params2, opt2)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert opt2.noise_offset == opt.noise_offset == 5 and opt2.backend == opt.backend
    assert "noise" in opt2.state_dict()                     # its state_dict hook came along


def test_copying_inside_a_step_is_refused():
    p = nn.Parameter(torch.ones(3))
    opt = BSAM([p], lr=0.05, num_data=10)
    opt.sample_noise()
    with pytest.raises(RuntimeError, match="inside an unfinished step"):
        copy.deepcopy(opt)


def test_a_compiled_step_equals_the_eager_one():
    """torch.compile(opt.step) with a closure: the step runs eagerly (graph breaks)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        step = torch.compile(opt.step) if compiled else opt.step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # Dynamo's notes about the profiler hooks
            losses = [float(step(closure)) for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in model.parameters()], opt.noise_offset))
    (la, pa, na), (lb, pb, nb) = results
    assert la == lb and na == nb == 3 and all(torch.equal(a, b) for a, b in zip(pa, pb))


@pytest.mark.parametrize("missing", ["noisy", "both"])
def test_a_forgotten_noisy_backward_is_refused(missing):
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
    x, y = make_data()
    before = [p.detach().clone() for p in model.parameters()]
    opt.sample_noise()
    with pytest.raises(RuntimeError, match="no parameter has a gradient at the noisy point"):
        opt.perturb()
    assert not opt.in_step
    if missing == "both":
        return
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # back at the mean
    F.cross_entropy(model(x), y).backward()            # the perturbed backward alone
    with pytest.raises(RuntimeError, match="finishes a step begun"):
        opt.step()


def test_gradients_accumulated_before_step_closure_are_not_dropped_silently():
    """Lightning's accumulate_grad_batches without BSAMCallback: a backward before the
    step that calls the closure. The step drops that gradient (it would be added to the
    noisy one), and says so; gradients the last step left go silently."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
    x, y = make_data()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
        opt.step(closure)                  # .grad holds what the last step left: no word
    F.cross_entropy(model(x), y).backward()           # a micro-batch accumulated for this step
    with pytest.warns(RuntimeWarning, match="accumulated"):
        opt.step(closure)


def test_lightning_accumulation_without_the_callback_warns():
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return BSAM(self.parameters(), lr=0.05, num_data=32, seed=7)
    x, y = make_data(n=32)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    with pytest.warns(RuntimeWarning, match="accumulated"):
        trainer.fit(Module(), train_dataloaders=data)


def test_max_grad_norm_clips_the_perturbed_gradient_as_clip_grad_norm_would(backend):
    """step(closure) with max_grad_norm equals the phase API with clip_grad_norm_ on the
    perturbed gradient (the noisy one unclipped), bit for bit."""
    x, y = make_data()
    results = []
    for builtin in (True, False):
        model = make_model()
        opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1, backend=backend,
                   max_grad_norm=0.05 if builtin else None)
        for _ in range(3):
            if builtin:
                opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward()))
            else:
                opt.zero_grad()
                opt.sample_noise()
                F.cross_entropy(model(x), y).backward()
                opt.perturb()
                F.cross_entropy(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=True)
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()] +
                       [v.clone() for p in model.parameters() for _, v in sorted(opt.state[p].items())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    unclipped = make_model()
    opt = BSAM(unclipped.parameters(), lr=0.05, num_data=10, seed=1, backend=backend)
    for _ in range(3):
        opt.step(lambda: (opt.zero_grad(), F.cross_entropy(unclipped(x), y).backward()))
    assert not all(torch.equal(a, b) for a, b in zip(results[0], unclipped.parameters()))


def test_max_grad_norm_with_m_parts_clips_the_mean():
    x, y = make_data(n=8)
    parts = split_batch(x, y, m=2)
    results = []
    for builtin in (True, False):
        model = make_model()
        opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1, backend="reference",
                   max_grad_norm=0.05 if builtin else None)

        def closure(k):
            opt.zero_grad()
            F.cross_entropy(model(parts[k][0]), parts[k][1]).backward()
        if builtin:
            opt.step_parts(closure, 2)
        else:
            for k in range(2):
                opt.sample_noise()
                F.cross_entropy(model(parts[k][0]), parts[k][1]).backward()
                opt.perturb()
                F.cross_entropy(model(parts[k][0]), parts[k][1]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2 * 0.05)    # .grad holds the sum of 2
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_max_grad_norm_is_checked():
    with pytest.raises(ValueError, match="max_grad_norm"):
        BSAM([nn.Parameter(torch.ones(2))], lr=0.1, num_data=10, max_grad_norm=-1.0)


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device"):
        BSAM(model.parameters(), lr=0.1, num_data=10, backend="foreach")


def test_an_empty_parameter_made_from_numpy_is_accepted(backend):
    empty = nn.Parameter(torch.from_numpy(np.zeros((3, 0, 2))))
    assert empty.stride() == (0, 0, 0)
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = BSAM([empty, w], lr=0.1, num_data=10, backend=backend, seed=0)
    opt.step(lambda: (opt.zero_grad(), ((w ** 2).sum() + empty.sum()).backward()))
    assert empty.shape == (3, 0, 2) and torch.isfinite(w).all() and opt.noise_offset == 1


def test_predict_bma_keeps_a_float64_models_dtype():
    model = make_model(dtype=torch.float64)
    opt = BSAM(model.parameters(), lr=0.1, num_data=10)
    x, _ = make_data(dtype=torch.float64)
    probs = predict_bma(model, opt, x, samples=2, generator=torch.Generator().manual_seed(0))
    assert probs.dtype == torch.float64
    model32 = make_model()
    opt32 = BSAM(model32.parameters(), lr=0.1, num_data=10)
    assert predict_bma(model32, opt32, x.float(), samples=1).dtype == torch.float32


def test_a_noisy_overflow_under_a_grad_scaler_backs_the_scale_off():
    """scaler.step(opt) checks the perturbed gradient only: an inf in the noisy gradient
    skips the step and counts as an overflow for the scaler, so that its scale backs off
    and a trainer watching it (accelerate's step_was_skipped: the LR scheduler of a
    Hugging Face Trainer) sees the skip."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = make_data()
    for poison in (False, True):
        scale = scaler.get_scale()
        weights = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        amp_parts(model, opt, scaler, x, y, poison)
        scaler.step(opt)
        scaler.update()
        if poison:
            assert scaler.get_scale() < scale
            assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
        else:
            assert scaler.get_scale() == scale
    assert opt.skipped_steps == 1


def test_a_closure_that_changes_the_gradients_after_perturb_is_refused():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
    x, y = make_data()
    before = [p.detach().clone() for p in model.parameters()]
    opt.sample_noise()
    F.cross_entropy(model(x), y).backward()
    opt.perturb()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="closure changed the gradients"):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert not opt.in_step and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_lightning_manual_optimization_fires_on_before_optimizer_step():
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from bsam_fast.integrations.lightning import bsam_manual_step
    seen = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return bsam_manual_step(self, lambda: F.cross_entropy(self.net(batch[0]), batch[1]))

        def on_before_optimizer_step(self, optimizer):
            seen.append(all(p.grad is not None for p in self.net.parameters()))

        def configure_optimizers(self):
            return BSAM(self.parameters(), lr=0.05, num_data=32, seed=7)
    x, y = make_data(n=32)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), train_dataloaders=data)
    assert seen == [True] * 4 and trainer.optimizers[0].noise_offset == 4


def test_clipping_fp16_gradients_still_scaled_by_a_grad_scaler():
    """fp16 gradients of 7 * 4096 each are finite, their norm over 8 elements (81096) is
    not in fp16: it is taken in fp32, and the step is made."""
    p = nn.Parameter(torch.full((8,), 0.5, dtype=torch.float16))
    opt = BSAM([p], lr=0.05, num_data=10, seed=1, backend="foreach", max_grad_norm=1e6)
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    before = p.detach().clone()
    opt.sample_noise()
    scaler.scale((p.float() * 7).sum()).backward()
    opt.perturb(grad_scaler=scaler)
    scaler.scale((p.float() * 7).sum()).backward()
    scaler.step(opt)
    assert not torch.equal(before, p.detach()) and opt.skipped_steps == 0


def test_zeroing_in_place_before_a_step_is_not_taken_for_accumulation():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
    x, y = make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            opt.sample_noise()
            F.cross_entropy(model(x), y).backward()
            opt.perturb()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def test_a_closure_without_backward_makes_no_step():
    """Lightning's training_step returning None (skip the batch): no step, no error."""
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=10, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step(lambda: None) is None
    assert not opt.in_step and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

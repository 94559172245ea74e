"""bSAM inside the trainers people use (Lightning, Hugging Face Trainer), and the cases
where a trainer or a user would get silently wrong numbers."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bsam_fast import BSAM, split_batch
from bsam_fast.predict import predict_bma
from helpers import make_data, make_model, snapshot


def _batches(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 5, 5, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


# --------------------------------------------------------------- silently wrong cases (4-9)
def test_stale_gradient_is_dropped_with_a_warning():
    """A .grad left from before sample_noise() is not added to the noisy gradient."""
    x, y = make_data()
    results = []
    for stale in (False, True):
        model = make_model()
        opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="reference", seed=3)
        warned = 0
        for _ in range(3):
            if stale:
                F.cross_entropy(model(x), y).backward()       # e.g. a snippet without zero_grad()
            else:
                opt.zero_grad()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.sample_noise()
            warned += sum("gradient from before the step" in str(w.message) for w in caught)
            F.cross_entropy(model(x), y).backward()
            opt.perturb()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert warned == (1 if stale else 0)            # once per optimizer
        results.append(snapshot(model, opt))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_zero_grad_that_would_drop_earlier_parts_is_refused():
    x, y = make_data(n=8)
    parts = split_batch(x, y, m=2)
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="reference", seed=3)
    for k, (xk, yk) in enumerate(parts):
        opt.sample_noise()
        F.cross_entropy(model(xk), yk).backward()
        opt.perturb()
        if k == 1:
            held = [p.grad.clone() for p in model.parameters()]
            with pytest.raises(RuntimeError, match="earlier parts"):
                opt.zero_grad()
            assert all(torch.equal(p.grad, h) for p, h in zip(model.parameters(), held))
        F.cross_entropy(model(xk), yk).backward()
    opt.step()


def test_step_parts_closures_may_zero_any_way():
    """opt.zero_grad(), model.zero_grad() or none at all in the closure: the same step."""
    x, y = make_data(n=8)
    parts = split_batch(x, y, m=2)
    results = []
    for zero in ("opt", "model", "none"):
        model = make_model()
        opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="reference", seed=3)

        def closure(k):
            if zero == "opt":
                opt.zero_grad()
            elif zero == "model":
                model.zero_grad()
            F.cross_entropy(model(parts[k][0]), parts[k][1]).backward()
        for _ in range(2):
            opt.zero_grad()
            opt.step_parts(closure, 2)
        results.append(snapshot(model, opt))
    for r in results[1:]:
        assert all(torch.equal(results[0][k], r[k]) for k in r)


def test_frozen_parameters_are_not_part_of_the_posterior(backend):
    model = make_model()
    model.conv.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=3)
    x, y = make_data()
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(model.conv.weight.detach().clone())    # at the noisy and perturbed points
        F.cross_entropy(model(x), y).backward()
    opt.step(closure)
    assert all(torch.equal(s, frozen["conv.weight"]) for s in seen)
    assert model.conv.weight not in opt.state and model.conv.bias not in opt.state
    with opt.sampled_params():
        assert torch.equal(model.conv.weight, frozen["conv.weight"])
        assert not torch.equal(model.fc1.weight, opt.state[model.fc1.weight].get("mean", model.fc1.weight * 0))
    std = dict(zip(map(id, model.parameters()), opt.posterior_std()))
    assert torch.equal(std[id(model.conv.weight)], torch.zeros_like(model.conv.weight))
    assert (std[id(model.fc1.weight)] > 0).all()
    predict_bma(model, opt, x, samples=2)
    assert torch.equal(model.conv.weight, frozen["conv.weight"])


def test_predict_bma_refuses_a_module_the_optimizer_does_not_train():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, seed=3)
    x, _ = make_data()
    with pytest.raises(ValueError, match="AveragedModel"):
        predict_bma(copy.deepcopy(model), opt, x, samples=2)
    with pytest.raises(ValueError, match="AveragedModel"):
        predict_bma(torch.optim.swa_utils.AveragedModel(model), opt, x, samples=2)


def test_state_dict_post_hooks_see_noise_and_skips():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, seed=3)
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(keys=set(sd)))
    opt.state_dict()
    assert {"noise", "skipped_steps"} <= seen["keys"]


# --------------------------------------------------------------- Hugging Face Trainer
class HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class HFData(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, use_cpu=True,
                report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                lr_scheduler_type="constant", max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("bf16,clip", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_hugging_face_trainer(tmp_path, bf16, clip):
    pytest.importorskip("transformers")
    from bsam_fast.integrations.huggingface import BSAMTrainer
    model = HFModel()
    before = [p.detach().clone() for p in model.parameters()]
    opt = BSAM(model.parameters(), lr=0.01, num_data=32, backend="reference", seed=5)
    trainer = BSAMTrainer(model=model, args=_hf_args(tmp_path, bf16=bf16, max_grad_norm=clip),
                          train_dataset=HFData(), optimizers=(opt, None))
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 8 and opt.noise_offset == steps and opt.skipped_steps == 0 and not opt.in_step
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_hugging_face_trainer_equals_a_plain_loop(tmp_path):
    """The same batches through BSAMTrainer and through opt.step(closure): the same result."""
    pytest.importorskip("transformers")
    from bsam_fast.integrations.huggingface import BSAMTrainer
    class InOrder(BSAMTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)
    data = HFData()
    model = HFModel()
    opt = BSAM(model.parameters(), lr=0.01, num_data=32, backend="reference", seed=5)
    trainer = InOrder(model=model, args=_hf_args(tmp_path, num_train_epochs=1), train_dataset=data,
                      optimizers=(opt, None))
    order = list(range(len(data)))
    trainer.train()
    plain = HFModel()
    opt2 = BSAM(plain.parameters(), lr=0.01, num_data=32, backend="reference", seed=5)
    for i in range(0, len(order), 8):
        idx = order[i:i + 8]
        x, y = data.x[idx], data.y[idx]
        opt2.step(lambda: (opt2.zero_grad(), plain(x, y)["loss"].backward()))
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_hugging_face_refusals(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer
    from bsam_fast.integrations.huggingface import BSAMTrainer
    model = HFModel()
    opt = BSAM(model.parameters(), lr=0.01, num_data=32, seed=5)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        BSAMTrainer(model=model, args=_hf_args(tmp_path, gradient_accumulation_steps=2),
                    train_dataset=HFData(), optimizers=(opt, None))
    plain = Trainer(model=model, args=_hf_args(tmp_path), train_dataset=HFData(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="bsam_fast.integrations"):
        plain.train()


# --------------------------------------------------------------- Lightning
def _lightning_module(manual: bool, backend="reference", clip=None):
    import lightning.pytorch as pl
    from bsam_fast.integrations.lightning import bsam_manual_step

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            if manual:
                return bsam_manual_step(self, lambda: F.cross_entropy(self.net(x), y), clip_val=clip)
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return BSAM(self.parameters(), lr=0.05, num_data=32, backend=backend, seed=7)
    return Module()


def _fit(module, callbacks=(), **trainer_kw):
    import lightning.pytorch as pl
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         **trainer_kw)
    xs, ys = zip(*_batches())
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=8, shuffle=False))
    return trainer


def test_lightning_automatic_and_manual_optimization_agree():
    pytest.importorskip("lightning")
    from bsam_fast.integrations.lightning import BSAMCallback
    auto, manual = _lightning_module(False), _lightning_module(True)
    t_auto = _fit(auto, [BSAMCallback()])
    t_manual = _fit(manual, [BSAMCallback()])
    opt_auto, opt_manual = t_auto.optimizers[0], t_manual.optimizers[0]
    assert opt_auto.noise_offset == opt_manual.noise_offset == 8
    for a, b in zip(auto.parameters(), manual.parameters()):
        assert torch.equal(a, b)


def test_lightning_optimizer_wrapper_shares_the_step_state():
    pytest.importorskip("lightning")
    from lightning.pytorch.core.optimizer import LightningOptimizer
    model = make_model()
    raw = BSAM(model.parameters(), lr=0.05, num_data=32, seed=7)
    wrapped = LightningOptimizer(raw)
    wrapped.sample_noise()
    assert wrapped.in_step and raw.in_step and raw.noise_offset == 1
    wrapped.cancel_step()
    assert not raw.in_step


def test_lightning_16_mixed_with_a_scaler():
    """The GradScaler path GPUs take: refused with automatic optimization (saying what
    works), and working in manual optimization."""
    pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision
    from bsam_fast.integrations.lightning import BSAMCallback

    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    with pytest.raises(ValueError, match="manual optimization"):
        _fit(_lightning_module(False), [BSAMCallback()], plugins=[plugin()])
    with pytest.raises(ValueError, match="clip_val with a GradScaler"):
        _fit(_lightning_module(True, clip=1.0), [BSAMCallback()], plugins=[plugin()])
    manual = _lightning_module(True)
    trainer = _fit(manual, [BSAMCallback()], plugins=[plugin()])
    opt = trainer.optimizers[0]
    assert opt.noise_offset == 8 and not opt.in_step
    assert all(torch.isfinite(p).all() for p in manual.parameters())
    # the same steps in fp32 (the scaler unscales exactly): close to the unscaled run
    ref = _lightning_module(True)
    _fit(ref, [BSAMCallback()])
    for a, b in zip(manual.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_lightning_refuses_accumulation_and_warns_on_clipping():
    pytest.importorskip("lightning")
    from bsam_fast.integrations.lightning import BSAMCallback
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        _fit(_lightning_module(False), [BSAMCallback()], accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="both the noisy and the perturbed"):
        _fit(_lightning_module(False), [BSAMCallback()], gradient_clip_val=1.0)


def test_accelerate_prepared_optimizer_with_a_closure():
    """A loop of one's own under accelerate: prepare(), accelerator.backward in the closure."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    x, y = make_data()
    results = []
    for use_accelerate in (False, True):
        model = make_model()
        opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="reference", seed=3)
        backward = lambda loss: loss.backward()
        if use_accelerate:
            accelerator = Accelerator(cpu=True)
            model, opt = accelerator.prepare(model, opt)
            backward = accelerator.backward
        for _ in range(3):
            opt.step(lambda: (opt.zero_grad(), backward(F.cross_entropy(model(x), y))))
        results.append([p.detach().clone() for p in model.parameters()])
        assert opt.optimizer.noise_offset == 3 if use_accelerate else opt.noise_offset == 3
    for a, b in zip(*results):
        assert torch.equal(a, b)

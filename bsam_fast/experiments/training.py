"""One training loop for every method of the comparison, so tables compare like with like:
SGD, Adam (torch.optim), SAM-SGD, SAM-Adam (baselines.SAM), bSAM, and the Bayesian
baselines IVON, SWAG and Laplace (``bayes_baselines.py``); plus the ablation bSAM without
noise (the linearisation at the mean, the paper's Table 3).

Every method gets the same schedule (linear warm-up for ``warmup_epochs``, then cosine
decay to 0), the same batches, and a Gaussian prior of the same precision (weight decay
prior precision / N). Each method has a predictive (``evaluate``'s ``"pred"``): at the
parameters for SGD, Adam and the SAMs; averaged over posterior samples for bSAM, IVON and
SWAG; the probit GLM predictive for Laplace.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from .baselines import SAM
from . import bayes_baselines
from ..optimizer import BSAM
from ..func import step_batched
from ..parts import split_batch
from ..predict import probabilities, eval_mode, predict_bma, predict_mean

METHODS = ("sgd", "adam", "sam_sgd", "sam_adam", "bsam", "ivon", "swag", "laplace")
ABLATIONS = ("bsam_nonoise",)
SAM_TYPES = ("sam_sgd", "sam_adam", "bsam", "bsam_nonoise")      # these take rho and m
SAMPLED = ("bsam", "bsam_nonoise", "ivon", "swag")               # predict by sampling

# Defaults per method (overridable); the prior precision is Config.prior_precision.
DEFAULTS = {
    "sgd": dict(lr=0.05, momentum=0.9),
    "adam": dict(lr=1e-3),
    "sam_sgd": dict(lr=0.05, momentum=0.9, rho=0.05),
    "sam_adam": dict(lr=1e-3, rho=0.05),
    "bsam": dict(lr=0.1, rho=0.01, damping=0.1, s_init=1.0),
    "bsam_nonoise": dict(lr=0.1, rho=0.01, damping=0.1, s_init=1.0),
    "ivon": dict(lr=0.1, hess_init=0.5),
    # SWAG: SGD, the schedule reaching swa_lr_ratio * lr at 3/4 of training, constant after,
    # where `snapshots` iterates are collected (rank: the last 10 deviations).
    "swag": dict(lr=0.05, momentum=0.9, swa_lr_ratio=0.1, snapshots=20, rank=10),
    "laplace": dict(lr=0.05, momentum=0.9),
}


@dataclass
class Config:
    method: str
    epochs: int = 5
    batch: int = 128
    prior_precision: float = 10.0
    m: int = 1
    seed: int = 0
    backend: str = "auto"
    warmup_epochs: float = 0.0
    hparams: dict = field(default_factory=dict)
    augment: bool = False           # random crops and flips of each batch (images)
    data_factor: float = 1.0        # N = data_factor x the examples (the authors' dafactor)
    batched_parts: bool = False     # bSAM's m parts with vmap (func.step_batched)

    def hp(self) -> dict:
        return {**DEFAULTS[self.method], **self.hparams}


@dataclass
class Trained:
    model: nn.Module
    opt: torch.optim.Optimizer
    ms_per_step: float
    posterior: object = None        # SWAG's moments, Laplace's fit


def make_optimizer(cfg: Config, model: nn.Module, num_data: int) -> torch.optim.Optimizer:
    if cfg.method not in METHODS + ABLATIONS:
        raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS + ABLATIONS}")
    if cfg.m > 1 and cfg.method not in SAM_TYPES:
        raise ValueError(f"m={cfg.m}: only the SAM-type methods {SAM_TYPES} take m parts")
    hp = cfg.hp()
    wd = cfg.prior_precision / num_data
    params = model.parameters()
    if cfg.method in ("sgd", "swag", "laplace"):
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=wd)
    if cfg.method == "adam":
        return torch.optim.Adam(params, lr=hp["lr"], weight_decay=wd)
    if cfg.method == "sam_sgd":
        return SAM(params, torch.optim.SGD, rho=hp["rho"], lr=hp["lr"], momentum=hp["momentum"], weight_decay=wd)
    if cfg.method == "sam_adam":
        return SAM(params, torch.optim.Adam, rho=hp["rho"], lr=hp["lr"], weight_decay=wd)
    if cfg.method == "ivon":
        return bayes_baselines.make_ivon(params, hp["lr"], num_data, cfg.prior_precision, hp["hess_init"])
    return BSAM(params, lr=hp["lr"], num_data=num_data, rho=hp["rho"], weight_decay=wd,
                damping=hp["damping"], s_init=hp["s_init"], backend=cfg.backend, seed=cfg.seed)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0, decay_end: Optional[int] = None) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `floor` at step
    `decay_end` (default: the last), constant after."""
    if step < warmup:
        return (step + 1) / warmup
    end = total if decay_end is None else decay_end
    t = min(1.0, (step - warmup) / max(1, end - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def train(model: nn.Module, cfg: Config, x: Tensor, y: Tensor, progress: bool = False,
          desc: Optional[str] = None, on_epoch=None) -> Trained:
    """Train with warm-up + cosine; returns the model, optimizer, ms per step (the median
    over the steps of forward, backward and update: a run paused or sharing its core for a
    while does not move it) and the method's posterior, if any.
    ``on_epoch(epoch, model)``, if given, is called after every epoch (untimed)."""
    torch.manual_seed(cfg.seed)
    n = len(x)
    opt = make_optimizer(cfg, model, n * cfg.data_factor)
    hp = cfg.hp()
    steps_per_epoch = n // cfg.batch
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training examples make no batch of {cfg.batch}")
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    swag = None
    if cfg.method == "swag":
        swag = bayes_baselines.SWAG(model, rank=int(hp["rank"]))
        swa_start = (3 * total) // 4
        every = max(1, (total - swa_start) // int(hp["snapshots"]))
        schedule = lambda s: lr_factor(s, total, warmup, hp["swa_lr_ratio"], swa_start)  # noqa: E731
    else:
        schedule = lambda s: lr_factor(s, total, warmup)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(cfg.seed)
    g_augment = torch.Generator().manual_seed(cfg.seed + 1)     # (the batches stay those of g)
    bar = _progress_bar(progress, total, desc or cfg.method)
    model.train()
    step_seconds, step = [], 0
    untimed = min(5, total // 10)     # the first steps pay for allocations and warm-up
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch:(i + 1) * cfg.batch]
            t0 = time.perf_counter()
            xb = augmented(x[idx], g_augment) if cfg.augment else x[idx]
            _one_step(cfg, model, opt, split_batch(xb, y[idx], m=cfg.m))
            if step >= untimed:
                step_seconds.append(time.perf_counter() - t0)
            step += 1
            with warnings.catch_warnings():
                # step_parts() (m > 1) is not the step() the scheduler wraps, so it would
                # say it stepped before the optimizer: it did not.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                sched.step()
            if swag is not None and step > swa_start and (step - swa_start) % every == 0:
                swag.collect()
            if bar is not None:
                bar.update()
        if on_epoch is not None:
            on_epoch(epoch, model)
    if bar is not None:
        bar.close()
    posterior = swag
    if swag is not None and swag.n:
        with torch.no_grad():                 # the SWA mean: what "mean" evaluates
            torch.nn.utils.vector_to_parameters(swag.mean, model.parameters())
    if cfg.method == "laplace":
        posterior = bayes_baselines.fit_laplace(model, x, y)
    return Trained(model, opt, 1e3 * statistics.median(step_seconds) if step_seconds else math.nan, posterior)


def extra_settings(augment: bool, data_factor: Optional[float], batched_parts: bool = False) -> dict:
    """--augment's and --batched-parts' settings for a Config and a run's spec; nothing
    without them (so that the specs, and the keys of finished runs, stay as they were)."""
    out = {"batched_parts": True} if batched_parts else {}
    if augment:
        out.update(augment=True, data_factor=4.0 if data_factor is None else float(data_factor))
    return out


def augmented(x: Tensor, g: torch.Generator, pad: int = 4) -> Tensor:
    """The standard CIFAR augmentation of a batch of images (N, C, H, W): a random crop of
    the image zero-padded by `pad` on each side, then a horizontal flip with probability 1/2."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def time_steps(model: nn.Module, cfg: Config, x: Tensor, y: Tensor, steps: int = 6) -> float:
    """Milliseconds per training step of `cfg` on `model` (the median of a few steps on the
    first batches of x; the model is trained a little: pass a throwaway one)."""
    opt = make_optimizer(cfg, model, len(x))
    times = []
    for i in range(steps):
        idx = torch.arange(i * cfg.batch, (i + 1) * cfg.batch) % len(x)
        t0 = time.perf_counter()
        _one_step(cfg, model, opt, split_batch(x[idx], y[idx], m=cfg.m))
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def _one_step(cfg: Config, model: nn.Module, opt, parts) -> None:
    def closure(k=0):
        opt.zero_grad()
        loss = F.cross_entropy(model(parts[k][0]), parts[k][1])
        loss.backward()
        return loss
    if cfg.method in SAM_TYPES:
        noise = None
        if cfg.method == "bsam_nonoise":     # xi = 0: both gradients at the mean
            zeros = [torch.zeros_like(p) for grp in opt.param_groups for p in grp["params"]]
            noise = [zeros] * cfg.m
        extra = {} if noise is None else {"noise": noise[0] if cfg.m == 1 else noise}
        if cfg.m == 1:
            opt.step(closure, **extra)
        elif cfg.batched_parts and isinstance(opt, BSAM):
            x, y = torch.cat([xk for xk, _ in parts]), torch.cat([yk for _, yk in parts])
            step_batched(opt, model, F.cross_entropy, x, y, cfg.m, **extra)
        else:
            opt.step_parts(closure, cfg.m, **extra)
    elif cfg.method == "ivon":
        with opt.sampled_params(train=True):
            closure()
        opt.step()
    else:
        closure()
        opt.step()


def _progress_bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


@torch.no_grad()
def predictive(trained: Trained, method: str, x: Tensor, samples: int = 32, seed: int = 0) -> Tensor:
    """The method's predictive probabilities (see the module docstring)."""
    model, opt = trained.model, trained.opt
    if method in ("bsam", "bsam_nonoise"):
        return predict_bma(model, opt, x, samples=samples, generator=torch.Generator().manual_seed(seed))
    if method == "ivon":
        torch.manual_seed(seed)                       # IVON samples from the global RNG
        with eval_mode(model):
            total = 0
            for _ in range(samples):
                with opt.sampled_params():
                    total = total + probabilities(model, x, 1024)
        return total / samples
    if method == "swag":
        return trained.posterior.predict(x, samples, seed)
    if method == "laplace":
        if trained.posterior is None:                 # diverged: no Laplace fit
            return torch.full_like(predict_mean(model, x), float("nan"))
        with eval_mode(model):
            return bayes_baselines.predict_laplace(trained.posterior, x)
    return predict_mean(model, x)


def evaluate(trained: Trained, method: str, x: Tensor, y: Tensor, samples: int = 32, seed: int = 0,
             x_ood: Optional[Tensor] = None) -> dict:
    """Metrics of the method's predictive ("pred") and at the parameters ("mean"; SWAG:
    the SWA mean), each with its probabilities ("probs")."""
    def scored(predict) -> dict:
        probs = predict(x)
        out = metrics.all_metrics(probs, y)
        if x_ood is not None:
            out["ood_auroc"] = metrics.ood_auroc(probs, predict(x_ood))
        return {**out, "probs": probs}
    mean = scored(lambda inputs: predict_mean(trained.model, inputs))
    if method not in SAMPLED + ("laplace",):           # the predictive is the mean's
        return {"mean": mean, "pred": mean}
    return {"mean": mean, "pred": scored(lambda inputs: predictive(trained, method, inputs, samples, seed))}

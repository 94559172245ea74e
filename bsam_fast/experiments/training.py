"""One training loop for every method of the comparison, so tables compare like with like:
SGD, Adam (torch.optim), SAM-SGD, SAM-Adam (baselines.SAM) and bSAM."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from .baselines import SAM
from ..optimizer import BSAM, split_batch
from ..predict import predict_bma, predict_mean

METHODS = ("sgd", "adam", "sam_sgd", "sam_adam", "bsam")

# Defaults per method (overridable); weight decay / prior precision as in the paper's setup:
# bSAM's delta = prior precision / N, the others' weight decay = prior precision / N too.
DEFAULTS = {
    "sgd": dict(lr=0.05, momentum=0.9),
    "adam": dict(lr=1e-3),
    "sam_sgd": dict(lr=0.05, momentum=0.9, rho=0.05),
    "sam_adam": dict(lr=1e-3, rho=0.05),
    "bsam": dict(lr=0.1, rho=0.01, damping=0.1, s_init=1.0),
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
    hparams: dict = field(default_factory=dict)

    def hp(self) -> dict:
        return {**DEFAULTS[self.method], **self.hparams}


def make_optimizer(cfg: Config, model: nn.Module, num_data: int) -> torch.optim.Optimizer:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS}")
    hp = cfg.hp()
    wd = cfg.prior_precision / num_data
    params = model.parameters()
    if cfg.method == "sgd":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=wd)
    if cfg.method == "adam":
        return torch.optim.Adam(params, lr=hp["lr"], weight_decay=wd)
    if cfg.method == "sam_sgd":
        return SAM(params, torch.optim.SGD, rho=hp["rho"], lr=hp["lr"], momentum=hp["momentum"], weight_decay=wd)
    if cfg.method == "sam_adam":
        return SAM(params, torch.optim.Adam, rho=hp["rho"], lr=hp["lr"], weight_decay=wd)
    return BSAM(params, lr=hp["lr"], num_data=num_data, rho=hp["rho"], weight_decay=wd,
                damping=hp["damping"], s_init=hp["s_init"], backend=cfg.backend, seed=cfg.seed)


def train(model: nn.Module, cfg: Config, x: Tensor, y: Tensor, progress: bool = False,
          desc: Optional[str] = None) -> tuple[torch.optim.Optimizer, float]:
    """Train with cosine-decayed learning rate; returns the optimizer and ms per step."""
    torch.manual_seed(cfg.seed)
    n = len(x)
    opt = make_optimizer(cfg, model, n)
    steps_per_epoch = n // cfg.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(cfg.seed)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc or cfg.method, leave=False)
        except ImportError:
            pass
    model.train()
    elapsed, steps = 0.0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch:(i + 1) * cfg.batch]
            parts = split_batch(x[idx], y[idx], m=cfg.m)

            def closure(k=0):
                opt.zero_grad()
                loss = F.cross_entropy(model(parts[k][0]), parts[k][1])
                loss.backward()
                return loss
            t0 = time.perf_counter()
            if cfg.method in ("sgd", "adam"):
                for k in range(cfg.m):           # plain gradient over the whole batch
                    loss = F.cross_entropy(model(parts[k][0]), parts[k][1]) / cfg.m
                    if k == 0:
                        opt.zero_grad()
                    loss.backward()
                opt.step()
            elif cfg.m == 1:
                opt.step(closure)              # through step(): what lr schedulers track
            else:
                opt.step_parts(closure, cfg.m)
            elapsed += time.perf_counter() - t0
            steps += 1
            sched.step()
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return opt, 1e3 * elapsed / max(1, steps)


def evaluate(model: nn.Module, opt, x: Tensor, y: Tensor, samples: int = 32, seed: int = 0,
             x_ood: Optional[Tensor] = None) -> dict:
    """Metrics at the parameters; for bSAM also of the posterior predictive (key 'bma')."""
    out = {}
    probs = predict_mean(model, x)
    out["mean"] = metrics.all_metrics(probs, y)
    if x_ood is not None:
        out["mean"]["ood_auroc"] = metrics.ood_auroc(probs, predict_mean(model, x_ood))
    out["mean"]["probs"] = probs
    if isinstance(opt, BSAM):
        gen = torch.Generator().manual_seed(seed)
        probs = predict_bma(model, opt, x, samples=samples, generator=gen)
        out["bma"] = metrics.all_metrics(probs, y)
        if x_ood is not None:
            gen = torch.Generator().manual_seed(seed)
            out["bma"]["ood_auroc"] = metrics.ood_auroc(probs, predict_bma(model, opt, x_ood, samples, gen))
        out["bma"]["probs"] = probs
    return out

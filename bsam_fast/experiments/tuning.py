"""Hyperparameter tuning fair to every method: the same validation split, a grid of the
same size per method, the same schedule and epochs, one selection rule.

Protocol (the paper's: grid search on validation accuracy):

* a seeded validation split: ``val_fraction`` (10%) of the training set, held out;
* a grid of ``GRID_SIZE`` (16) configurations per method: the SAM-type methods (SAM-SGD,
  SAM-Adam, bSAM) take 2 learning rates x 2 rho x 2 prior precisions x m in {1, 8};
  the others 8 learning rates x 2 prior precisions (Laplace: the SGD it starts from; its
  own prior precision is then fitted by marginal likelihood);
* every configuration trained on the rest of the training set with warm-up + cosine,
  evaluated by its predictive on the validation split;
* selected by validation accuracy (ties: lower NLL), the paper's rule; the NLL-selected
  configuration is reported next to it.

``quick`` grids (the first and last configuration of each, for smoke tests) keep the
same structure. IVON runs with its package's defaults besides (hess_init 1, beta2
0.99999): its posterior variance then moves little from 1/(N (1 + delta)) in runs this
short; tuning hess_init is left out to keep the grids the same size.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import torch

from .training import ABLATIONS, METHODS, SAM_TYPES, Config, evaluate, train

GRID_SIZE = 16
# Learning-rate ranges per method (log-spaced; the SAM types use the two middle values).
LR_RANGES = {"sgd": (0.005, 0.5), "swag": (0.005, 0.5), "laplace": (0.005, 0.5), "sam_sgd": (0.005, 0.5),
             "adam": (1e-4, 1e-2), "sam_adam": (1e-4, 1e-2),
             "bsam": (0.05, 2.0), "bsam_nonoise": (0.05, 2.0), "ivon": (0.01, 1.0)}
RHOS = {"sam_sgd": (0.01, 0.05), "sam_adam": (0.01, 0.05), "bsam": (0.005, 0.02), "bsam_nonoise": (0.005, 0.02)}
PRIOR_PRECISIONS = (10.0, 40.0)
PARTS = (1, 8)


def _log_space(lo: float, hi: float, k: int) -> list[float]:
    if k == 1:
        return [float((lo * hi) ** 0.5)]
    return [float(lo * (hi / lo) ** (i / (k - 1))) for i in range(k)]


def grid(method: str, quick: bool = False) -> list[dict]:
    """The configurations tried for `method`: dicts of lr, prior_precision (and rho, m)."""
    lo, hi = LR_RANGES[method]
    if method in SAM_TYPES:
        lrs = _log_space(lo, hi, 4)[1:3]
        combos = itertools.product(lrs, RHOS[method], PRIOR_PRECISIONS, PARTS)
        out = [dict(lr=lr, rho=rho, prior_precision=pp, m=m) for lr, rho, pp, m in combos]
    else:
        combos = itertools.product(_log_space(lo, hi, 8), PRIOR_PRECISIONS)
        out = [dict(lr=lr, prior_precision=pp) for lr, pp in combos]
    assert len(out) == GRID_SIZE
    return [out[0], out[-1]] if quick else out       # quick: both ends (m = 1 and m = 8)


def validation_split(x, y, fraction: float = 0.1, seed: int = 0):
    """(x_train, y_train, x_val, y_val): a seeded random `fraction` held out."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(x))))
    val, rest = perm[:n_val], perm[n_val:]
    return x[rest], y[rest], x[val], y[val]


def config_from(method: str, choice: dict, **common) -> Config:
    """A Config from a grid entry (lr, rho, prior_precision, m) and the common settings."""
    hp = {k: v for k, v in choice.items() if k not in ("prior_precision", "m")}
    return Config(method=method, prior_precision=choice["prior_precision"], m=choice.get("m", 1),
                  hparams=hp, **common)


def select(trials: list[dict], key: str) -> dict:
    """The best trial by validation accuracy (ties: lower NLL), or by lower NLL; a trial
    with a non-finite accuracy or NLL (a diverged run) ranks last."""
    def finite(value, worst):
        return value if math.isfinite(value) else worst
    if key == "accuracy":
        return max(trials, key=lambda t: (finite(t["val"]["accuracy"], -math.inf),
                                          -finite(t["val"]["nll"], math.inf)))
    return min(trials, key=lambda t: finite(t["val"]["nll"], math.inf))


def tune(x, y, methods, make_model, *, epochs: int, batch: int, warmup_epochs: float, seed: int = 0,
         samples: int = 8, val_fraction: float = 0.1, quick: bool = False, backend: str = "auto",
         log=print) -> dict:
    """Run every method's grid; returns the protocol, all trials and the selections."""
    x_fit, y_fit, x_val, y_val = validation_split(x, y, val_fraction, seed)
    common = dict(epochs=epochs, batch=batch, seed=seed, backend=backend, warmup_epochs=warmup_epochs)
    out = {"protocol": dict(val_fraction=val_fraction, split_seed=seed, train_examples=len(x_fit),
                            val_examples=len(x_val), grid_size=len(grid(methods[0], quick)),
                            selection="validation accuracy (ties: lower NLL)", samples=samples, **common),
           "grids": {m: grid(m, quick) for m in methods}, "trials": {}, "selected": {}, "selected_by_nll": {}}
    for method in methods:
        trials = []
        for choice in grid(method, quick):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            trained = train(make_model(), config_from(method, choice, **common), x_fit, y_fit)
            res = evaluate(trained, method, x_val, y_val, samples=samples, seed=seed)
            val = {k: v for k, v in res["pred"].items() if k != "probs"}
            trials.append({"hparams": choice, "val": val, "ms_per_step": trained.ms_per_step})
            log(f"{method} {choice}: val acc {val['accuracy']:.4f} nll {val['nll']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
        out["trials"][method] = trials
        out["selected"][method] = select(trials, "accuracy")
        out["selected_by_nll"][method] = select(trials, "nll")
    return out


def run_tune(args) -> dict:
    from .run import _model_for, _load_train
    x_tr, y_tr = _load_train(args)
    os.makedirs(args.out, exist_ok=True)
    result = tune(x_tr, y_tr, args.methods, lambda: _model_for(args.model, x_tr), epochs=args.epochs,
                  batch=args.batch, warmup_epochs=args.warmup_epochs, seed=args.seed, samples=args.samples,
                  val_fraction=args.val_fraction, quick=args.quick, backend=args.backend)
    result["protocol"].update(dataset=args.dataset, model=args.model)
    path = os.path.join(args.out, "tuned.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for method in args.methods:
        s, n = result["selected"][method], result["selected_by_nll"][method]
        print(f"{method}: by accuracy {s['hparams']} (val acc {s['val']['accuracy']:.4f}); "
              f"by NLL {n['hparams']} (val NLL {n['val']['nll']:.4f})")
    print(f"wrote {path}")
    return result


__all__ = ["GRID_SIZE", "grid", "validation_split", "config_from", "select", "tune", "run_tune",
           "METHODS", "ABLATIONS"]

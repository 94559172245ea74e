"""Hyperparameter tuning fair to every method: the same validation split, a grid of the
same size per method, the same schedule and epochs, one selection rule.

Protocol (the paper's: grid search on validation accuracy):

* a seeded validation split: ``val_fraction`` of the training set, held out;
* a grid of ``GRID_SIZE`` (16) configurations per method, each containing the region its
  authors publish: the SAM-type methods (SAM-SGD, SAM-Adam, bSAM and its ablation) take
  4 learning rates x 2 rho x 2 prior precisions with m = 8 parts (the bSAM authors'
  ``batchsplit``); IVON 4 learning rates x 2 Hessian initialisations x 2 prior
  precisions; the others 8 learning rates x 2 prior precisions. The prior precisions are
  1 and 25 for every method (25: the bSAM authors' default; 1: their digits setting);
  bSAM's learning rates include the authors' 0.25-0.5, its rho their 0.01-0.1;
* every configuration trained on the rest of the training set with warm-up + cosine,
  evaluated by its predictive on the validation split;
* selected by validation accuracy (ties: lower NLL), the paper's rule; the NLL-selected
  configuration is reported next to it;
* a selection at an end of its learning-rate axis is not reported: the axis is shifted one
  step past that end (the grid keeps its size) and the new configurations are run, until
  the selection is inside (at most ``max_shifts`` times; ``at_edge`` says if it still is).

Each finished configuration is stored as it ends (``store.RunStore``), so an interrupted
``tune`` restarted with the same arguments runs only what is missing.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import torch

from . import data
from .models import model_for
from .store import RunStore
from .training import ABLATIONS, METHODS, SAM_TYPES, Config, extra_settings, evaluate, train, time_steps

GRID_SIZE = 16
PRIOR_PRECISIONS = (1.0, 25.0)
SAM_PARTS = 8
# Learning-rate axes: (first value, ratio between neighbours, count); shifted by one ratio
# step when a selection sits at an end.
LR_AXES = {"sgd": (0.005, 100 ** (1 / 7), 8), "swag": (0.005, 100 ** (1 / 7), 8),
           "laplace": (0.005, 100 ** (1 / 7), 8), "adam": (1e-4, 100 ** (1 / 7), 8),
           "sam_sgd": (0.025, 2.0, 4), "sam_adam": (2.5e-4, 2.0, 4),
           "bsam": (0.125, 2.0, 4), "bsam_nonoise": (0.125, 2.0, 4), "ivon": (0.05, 2.0, 4)}
RHOS = {"sam_sgd": (0.01, 0.05), "sam_adam": (0.01, 0.05), "bsam": (0.01, 0.05), "bsam_nonoise": (0.01, 0.05)}
IVON_HESS_INITS = (0.1, 0.5)


def lr_axis(method: str, shift: int = 0) -> list[float]:
    """The learning rates of `method`'s grid, moved `shift` steps (negative: smaller)."""
    first, ratio, count = LR_AXES[method]
    return [float(first * ratio ** (i + shift)) for i in range(count)]


def grid(method: str, quick: bool = False, shift: int = 0) -> list[dict]:
    """The configurations tried for `method`: dicts of lr, prior_precision (and rho and m,
    or hess_init)."""
    lrs = lr_axis(method, shift)
    if method in SAM_TYPES:
        combos = itertools.product(lrs, RHOS[method], PRIOR_PRECISIONS)
        out = [dict(lr=lr, rho=rho, prior_precision=pp, m=SAM_PARTS) for lr, rho, pp in combos]
    elif method == "ivon":
        combos = itertools.product(lrs, IVON_HESS_INITS, PRIOR_PRECISIONS)
        out = [dict(lr=lr, hess_init=h, prior_precision=pp) for lr, h, pp in combos]
    else:
        out = [dict(lr=lr, prior_precision=pp) for lr, pp in itertools.product(lrs, PRIOR_PRECISIONS)]
    assert len(out) == GRID_SIZE
    return [out[0], out[-1]] if quick else out       # quick: both ends


def edge_direction(method: str, selected: dict, shift: int) -> int:
    """-1 or +1 if the selected learning rate is the smallest or largest of the axis, else 0."""
    lrs = lr_axis(method, shift)
    if math.isclose(selected["lr"], lrs[0]):
        return -1
    return 1 if math.isclose(selected["lr"], lrs[-1]) else 0


def validation_split(x, y, fraction: float = 0.1, seed: int = 0):
    """(x_train, y_train, x_val, y_val): a seeded random `fraction` held out."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(x))))
    val, rest = perm[:n_val], perm[n_val:]
    return x[rest], y[rest], x[val], y[val]


def config_from(method: str, choice: dict, **common) -> Config:
    """A Config from a grid entry (lr, rho, prior_precision, m, ...) and the common settings."""
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
         store: RunStore | None = None, spec_base: dict | None = None, max_shifts: int = 6,
         progress: bool = False, log=print, settings: dict | None = None) -> dict:
    """Run every method's grid (shifting learning-rate axes away from edge selections);
    returns the protocol, all trials and the selections."""
    x_fit, y_fit, x_val, y_val = validation_split(x, y, val_fraction, seed)
    common = dict(epochs=epochs, batch=batch, seed=seed, backend=backend, warmup_epochs=warmup_epochs,
                  **(settings or {}))     # (training.extra_settings: empty unless --augment or --batched-parts)
    base = {"command": "tune", **(spec_base or {}), **common, "samples": samples, "val_fraction": val_fraction,
            "train_examples": len(x_fit)}

    def trial(method, choice):
        def compute():
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            trained = train(make_model(), config_from(method, choice, **common), x_fit, y_fit, progress=progress,
                            desc=f"{method} {choice}")
            res = evaluate(trained, method, x_val, y_val, samples=samples, seed=seed)
            return {"hparams": choice, "val": {k: v for k, v in res["pred"].items() if k != "probs"},
                    "ms_per_step": trained.ms_per_step, "seconds": time.perf_counter() - t0}
        spec = {**base, "method": method, "hparams": choice}
        if store is None:
            return compute()
        record, cached = store.run(spec, compute)
        log(f"{method} {choice}: val acc {record['val']['accuracy']:.4f} nll {record['val']['nll']:.4f} "
            + ("(finished before)" if cached else f"({record['seconds']:.0f} s)"))
        return record

    _announce(methods, quick, make_model, x_fit, y_fit, common, store, base, log)
    out = {"protocol": dict(val_fraction=val_fraction, split_seed=seed, train_examples=len(x_fit),
                            val_examples=len(x_val), grid_size=len(grid(methods[0], quick)),
                            selection="validation accuracy (ties: lower NLL)", samples=samples,
                            prior_precisions=list(PRIOR_PRECISIONS), **common),
           "grids": {}, "trials": {}, "selected": {}, "selected_by_nll": {}, "lr_shift": {}, "at_edge": {}}
    for method in methods:
        shift, trials = 0, {}
        while True:
            configs = grid(method, quick, shift)
            for choice in configs:
                key = json.dumps(choice, sort_keys=True)
                if key not in trials:
                    trials[key] = trial(method, choice)
            current = [trials[json.dumps(c, sort_keys=True)] for c in configs]
            best = select(current, "accuracy")
            direction = 0 if quick else edge_direction(method, best["hparams"], shift)
            if direction == 0 or abs(shift + direction) > max_shifts:
                break
            log(f"{method}: selection at lr {best['hparams']['lr']:.4g}, an end of the grid; shifting the axis")
            shift += direction
        out["grids"][method] = configs
        out["trials"][method] = list(trials.values())
        out["selected"][method] = best
        out["selected_by_nll"][method] = select(current, "nll")
        out["lr_shift"][method] = shift
        out["at_edge"][method] = direction != 0
    return out


def _announce(methods, quick, make_model, x, y, common, store, base, log) -> None:
    """Print the expected time of the runs still to do (from a few timed steps of each)."""
    total, pending = 0.0, 0
    steps = common["epochs"] * (len(x) // common["batch"])
    for method in methods:
        todo = [c for c in grid(method, quick)
                if store is None or store.get({**base, "method": method, "hparams": c}) is None]
        if todo:
            ms = time_steps(make_model(), config_from(method, todo[0], **common), x, y)
            total += len(todo) * steps * ms / 1e3
            pending += len(todo)
    log(f"tune: {pending} runs to do of {sum(len(grid(m, quick)) for m in methods)}, "
        f"expected ~{total / 60:.0f} min (more if a selection sits at a grid's edge)")


def run_tune(args) -> dict:
    x_tr, y_tr = data.load_train(args.dataset, args.train_subset, args.data_root)
    os.makedirs(args.out, exist_ok=True)
    spec_base = {"dataset": args.dataset, "model": args.model, "train_subset": args.train_subset}
    result = tune(x_tr, y_tr, args.methods, lambda: model_for(args.model, x_tr), epochs=args.epochs,
                  batch=args.batch, warmup_epochs=args.warmup_epochs, seed=args.seed, samples=args.samples,
                  val_fraction=args.val_fraction, quick=args.quick, backend=args.backend,
                  store=RunStore(os.path.join(args.out, "runs")), spec_base=spec_base,
                  max_shifts=args.max_shifts, progress=not args.no_progress, settings=extra_settings(
                      getattr(args, "augment", False), getattr(args, "data_factor", None),
                      getattr(args, "batched_parts", False)))
    result["protocol"].update(dataset=args.dataset, model=args.model, train_subset=args.train_subset)
    path = os.path.join(args.out, "tuned.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for method in args.methods:
        s, n = result["selected"][method], result["selected_by_nll"][method]
        edge = " (STILL AT THE GRID'S EDGE)" if result["at_edge"][method] else ""
        print(f"{method}: by accuracy {s['hparams']} (val acc {s['val']['accuracy']:.4f}){edge}; "
              f"by NLL {n['hparams']} (val NLL {n['val']['nll']:.4f})")
    print(f"wrote {path}")
    return result


__all__ = ["GRID_SIZE", "grid", "lr_axis", "validation_split", "config_from", "select", "tune", "run_tune",
           "METHODS", "ABLATIONS"]

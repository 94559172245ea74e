"""Main job: Adam, SAM-Adam and bSAM on scikit-learn's digits, each with the
hyperparameters the tuner selected for it on a validation split of digits' training set
(``experiments/tuned_digits_mlp.json``, written by ``python -m bsam_fast.experiments tune
--dataset digits ...``; see the README), over several seeds; compared on accuracy, NLL,
ECE, AUROC and time per step, and summed up in one line. Writes a reliability diagram.

    python -m bsam_fast.demo [--seeds 0 1 2] [--backend auto] [--out results/demo]

bSAM is reported for its posterior predictive (Bayesian model averaging over --samples
posterior samples) and at its mean. Runs in under 2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from . import metrics
from .experiments import data
from .experiments.models import make_model
from .experiments.training import evaluate, train
from .experiments.tuning import config_from

TUNED = os.path.join(os.path.dirname(__file__), "experiments", "tuned_digits_mlp.json")
METHODS = {"adam": "Adam", "sam_adam": "SAM-Adam", "bsam": "bSAM"}
KEYS = ("accuracy", "nll", "ece", "auroc")
HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False, "auroc": True}


def load_digits_split(seed: int = 0):
    """Digits as flat, standardised vectors: (x_train, y_train, x_test, y_test) (used by
    the distributed examples)."""
    x_tr, y_tr = data.load_digits("train", seed)
    x_te, y_te = data.load_digits("test", seed)
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def compare(ours: dict, theirs: dict) -> dict:
    """Per metric: "better", "worse" or "equal" (the means differ by no more than the sum
    of the two standard deviations over the seeds) for `ours` against `theirs` (lists of
    per-seed values); "undefined" if a value is not finite (an AUROC with no error)."""
    out = {}
    for k in KEYS:
        a, b = torch.tensor(ours[k], dtype=torch.float64), torch.tensor(theirs[k], dtype=torch.float64)
        if len(a) < 2 or len(b) < 2:
            raise ValueError("compare() needs two seeds or more: with one there is no spread")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            out[k] = "undefined"
            continue
        spread = a.std() + b.std()
        diff = (a.mean() - b.mean()).item()
        if abs(diff) <= float(spread):
            out[k] = "equal"
        else:
            out[k] = "better" if (diff > 0) == HIGHER_IS_BETTER[k] else "worse"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuned", default=TUNED, help="tuned.json of the digits tuner")
    ap.add_argument("--epochs", type=int, default=None, help="default: the tuner's")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=os.path.join("results", "demo"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    with open(args.tuned) as f:
        tuned = json.load(f)
    protocol = tuned["protocol"]
    epochs = args.epochs or protocol["epochs"]
    x_tr, y_tr = data.load("digits", "train")
    x_te, y_te = data.load("digits", "test")
    runs = {}                                    # row name -> metric -> per-seed values
    probs, ms = {}, {}
    for method, label in METHODS.items():
        choice = tuned["selected"][method]["hparams"]
        for seed in args.seeds:
            cfg = config_from(method, choice, epochs=epochs, batch=protocol["batch"], seed=seed,
                              backend=args.backend, warmup_epochs=protocol["warmup_epochs"])
            torch.manual_seed(seed)
            trained = train(make_model("mlp", in_features=x_tr[0].numel()), cfg, x_tr, y_tr)
            res = evaluate(trained, method, x_te, y_te, samples=args.samples, seed=seed)
            rows = {label: res["pred"]}
            if method == "bsam":
                label = f"bSAM [{trained.opt.backend}] BMA S={args.samples}"
                rows = {label: res["pred"], f"bSAM [{trained.opt.backend}] at mean": res["mean"]}
            for name, r in rows.items():
                for k in KEYS:
                    runs.setdefault(name, {}).setdefault(k, []).append(r[k])
                ms.setdefault(name, []).append(trained.ms_per_step)
                if seed == args.seeds[0]:
                    probs[name] = r["probs"]
    print(f"digits: {len(x_tr)} train / {len(x_te)} test, MLP 64-500-300-10, {epochs} epochs, "
          f"batch {protocol['batch']}, seeds {args.seeds}; hyperparameters tuned on a "
          f"{protocol['val_fraction']:.0%} validation split ({os.path.basename(args.tuned)})")
    print(f"{'method':<28}" + "".join(f"{k:>17}" for k in ("accuracy", "NLL", "ECE", "AUROC")) + f"{'ms/step':>9}")
    for name, r in runs.items():
        cells = "".join(f"{torch.tensor(r[k]).mean():>10.4f} ± {torch.tensor(r[k]).std() if len(r[k]) > 1 else 0:.4f}"
                        for k in KEYS)
        print(f"{name:<28}{cells}{sum(ms[name]) / len(ms[name]):>9.2f}")
    bsam = next(n for n in runs if "BMA" in n)
    verdicts = {}
    if len(args.seeds) > 1:
        verdicts = {other: compare(runs[bsam], runs[other]) for other in ("Adam", "SAM-Adam")}
        summary = "; ".join(f"vs {other}: " + ", ".join(f"{k} {v}" for k, v in vs.items())
                            for other, vs in verdicts.items())
        print(f"In one line: bSAM's posterior predictive {summary} (equal: the means differ by "
              f"no more than the sum of the two stds over {len(args.seeds)} seeds).")
    else:
        print("In one line: one seed gives no spread, so no verdict (use --seeds with two or more).")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "reliability.png")
    metrics.reliability_diagram(probs, y_te, path)
    print(f"reliability diagram: {path}; total {time.perf_counter() - t_start:.0f} s")
    return {"runs": runs, "verdicts": verdicts}


if __name__ == "__main__":
    main()

"""Main job: what the package is for, in three parts, in under two minutes on 2 CPU cores.

    python -m bsam_fast.demo [--seeds 0 1 2] [--backend auto] [--out results/demo]

(a) **Exact.** The fused step (``backend="auto"``: the compiled kernels) against the
    pure-PyTorch reference that replays the authors' code: the largest difference in the
    parameters and the optimizer state after a few steps of an MLP on the same batches.
(b) **Fast.** The optimizer's own work per step (``bench.py``'s method: medians of 20) of
    the fused backend, the reference and AdamW (fused=True) on the parameter list of
    ResNet-20 and on 400 tensors of 16 elements (the host overhead).
(c) **Calibrated.** Adam, SAM-Adam and bSAM on scikit-learn's digits, each with the
    hyperparameters the tuner selected for it on a validation split at the same budget
    (``experiments/tuned_digits_mlp.json``, written by ``python -m bsam_fast.experiments
    tune --dataset digits ...``; see docs/experiments.md), over several seeds: accuracy, NLL, ECE,
    AUROC and time per step, bSAM for its posterior predictive (Bayesian model averaging
    over --samples posterior samples) and at its mean; a reliability diagram.

The last line sums the three up, from the numbers above it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time

import torch
import torch.nn.functional as F

from . import BSAM, bench, metrics
from .experiments import data
from .experiments.models import make_model
from .experiments.training import evaluate, train
from .experiments.tuning import config_from

TUNED = os.path.join(os.path.dirname(__file__), "experiments", "tuned_digits_mlp.json")
METHODS = {"adam": "Adam", "sam_adam": "SAM-Adam", "bsam": "bSAM"}
KEYS = ("accuracy", "nll", "ece", "auroc")


def load_digits_split(seed: int = 0):
    """Digits as flat, standardised vectors: (x_train, y_train, x_test, y_test) (used by
    the distributed examples)."""
    x_tr, y_tr = data.load_digits("train", seed)
    x_te, y_te = data.load_digits("test", seed)
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def max_difference(backend: str, steps: int = 5, seed: int = 0) -> tuple[str, float, float]:
    """(the backend "auto"-like name resolved, max |difference|, largest |value|) between
    `backend` and the reference over the parameters and the optimizer state after `steps`
    steps of step(closure) of the digits MLP on the same batches and noise."""
    x, y = data.load("digits", "train")
    x = x.flatten(1)
    out = {}
    for name in (backend, "reference"):
        torch.manual_seed(seed)
        model = make_model("mlp", in_features=x.shape[1])
        opt = BSAM(model.parameters(), lr=0.05, num_data=len(x), rho=0.02, weight_decay=10 / len(x),
                   backend=name, seed=seed)
        for t in range(steps):
            xb, yb = x[64 * t:64 * (t + 1)], y[64 * t:64 * (t + 1)]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            opt.step(closure)
        values = [p.detach() for p in model.parameters()]
        values += [v for p in model.parameters() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
        out[name] = (opt.backend, values)
    diff = max((a - b).abs().max().item() for a, b in zip(out[backend][1], out["reference"][1]))
    scale = max(b.abs().max().item() for b in out["reference"][1])
    return out[backend][0], diff, scale


def speed_rows(backend: str, reps: int = 20) -> list[bench.Record]:
    """bench.py's rows on the CPU, one thread (as the README's): the ResNet-20 list (0.27M)
    with the reference, and the host layout (400 and 86 tensors of 16)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = torch.device("cpu")
        return (bench.run_ops(cpu, [273_258], ["resnet20"], torch.float32,
                              list(dict.fromkeys([backend, "reference"])), reps, progress=False)
                + bench.run_ops(cpu, [0], ["host"], torch.float32, [backend], reps, progress=False))
    finally:
        torch.set_num_threads(threads)


def _digits_run(job) -> tuple[dict, float]:
    """One (method, hyperparameters, seed) of part (c), in a worker process of one thread:
    the evaluation (with the probabilities) and the ms per training step."""
    method, choice, seed, settings = job
    torch.set_num_threads(1)
    x_tr, y_tr = data.load("digits", "train")
    x_te, y_te = data.load("digits", "test")
    cfg = config_from(method, choice, epochs=settings["epochs"], batch=settings["batch"], seed=seed,
                      backend=settings["backend"], warmup_epochs=settings["warmup_epochs"])
    torch.manual_seed(seed)
    trained = train(make_model("mlp", in_features=x_tr[0].numel()), cfg, x_tr, y_tr)
    return evaluate(trained, method, x_te, y_te, samples=settings["samples"], seed=seed), trained.ms_per_step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuned", default=TUNED, help="tuned.json of the digits tuner")
    ap.add_argument("--epochs", type=int, default=None, help="default: the tuner's")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workers", type=int, default=2, help="processes for the digits runs (one thread each)")
    ap.add_argument("--out", default=os.path.join("results", "demo"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    summary = []

    print("(a) exact: the step against the pure-PyTorch reference (the authors' update), 5 steps of "
          "the digits MLP, same batches and noise")
    name, diff, scale = max_difference(args.backend)
    print(f"    backend {name!r}: max |difference| over parameters and state {diff:.2e} (largest value "
          f"{scale:.2f}; float32 round-off)")
    summary.append(f"the {name!r} step equals the reference to {diff:.0e}")

    records = speed_rows(name)
    print(f"\n(b) fast: the optimizer's work per step (sample + perturb + update; AdamW: step) on this CPU, "
          f"{records[0].device_name}, median of 20")
    print(f"    {'parameters':<30}{'backend':<14}{'ms/step':>9}{'x AdamW(fused)':>16}")
    for r in records:
        what = "ResNet-20 list (86 tensors)" if r.layout == "resnet20" else f"{r.ntensors} tensors of 16"
        if r.backend != "adamw_foreach":
            # (the host layout's ratio is to AdamW timed in the same loop: see bench.py)
            ratio = r.phases_ms.get("ratio_vs_adamw_fused_same_loop", r.ratio_vs_adamw_fused)
            print(f"    {what:<30}{r.backend:<14}{r.median_ms:>9.3f}{ratio:>16.2f}")
    ours = [r for r in records if r.backend == name and r.layout == "resnet20"][0]
    ref = [r for r in records if r.backend == "reference" and r.layout == "resnet20"][0]
    summary.append(f"costs {ours.ratio_vs_adamw_fused:.1f}x AdamW(fused)'s step on ResNet-20's list "
                   f"({ref.median_ms / ours.median_ms:.1f}x faster than the reference)")

    with open(args.tuned) as f:
        tuned = json.load(f)
    protocol = tuned["protocol"]
    epochs = args.epochs or protocol["epochs"]
    x_tr, y_tr = data.load("digits", "train")
    x_te, y_te = data.load("digits", "test")
    print(f"\n(c) calibrated: digits, {len(x_tr)} train / {len(x_te)} test, MLP 64-500-300-10, {epochs} epochs, "
          f"batch {protocol['batch']}, seeds {args.seeds}; each method's hyperparameters tuned on a "
          f"{protocol['val_fraction']:.0%} validation split at this budget ({os.path.basename(args.tuned)})")
    # The runs are independent: two worker processes of one thread each (on two cores that
    # is faster than one process of two threads for a model this small).
    jobs = [(method, tuned["selected"][method]["hparams"], seed) for method in METHODS for seed in args.seeds]
    settings = dict(epochs=epochs, batch=protocol["batch"], warmup_epochs=protocol["warmup_epochs"],
                    backend=args.backend, samples=args.samples)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_digits_run, [(*job, settings) for job in jobs]))
    runs = {}                                    # row name -> metric -> per-seed values
    probs, ms = {}, {}
    for (method, _, seed), (res, ms_per_step) in zip(jobs, results):
        rows = {METHODS[method]: res["pred"]}
        if method == "bsam":
            rows = {f"bSAM BMA S={args.samples}": res["pred"], "bSAM at mean": res["mean"]}
        for row, r in rows.items():
            for k in KEYS:
                runs.setdefault(row, {}).setdefault(k, []).append(r[k])
            ms.setdefault(row, []).append(ms_per_step)
            if seed == args.seeds[0]:
                probs[row] = r["probs"]
    print(f"    {'method':<20}" + "".join(f"{k:>17}" for k in ("accuracy", "NLL", "ECE", "AUROC")) + f"{'ms/step':>9}")
    for row, r in runs.items():
        cells = "".join(f"{torch.tensor(r[k]).mean():>10.4f} ± {torch.tensor(r[k]).std() if len(r[k]) > 1 else 0:.4f}"
                        for k in KEYS)
        print(f"    {row:<20}{cells}{sum(ms[row]) / len(ms[row]):>9.2f}")
    bsam = next(n for n in runs if "BMA" in n)
    verdicts = {}
    if len(args.seeds) > 1:
        verdicts = {other: metrics.compare(runs[bsam], runs[other], KEYS) for other in ("Adam", "SAM-Adam")}
        summary.append("bSAM's posterior predictive on digits, " + "; ".join(
            f"vs {other}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for other, vs in verdicts.items())
            + f" (equal: the means differ by no more than the sum of the two stds over {len(args.seeds)} seeds)")
    else:
        summary.append("one seed gives no spread, so no verdict on digits (use --seeds with two or more)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "reliability.png")
    metrics.reliability_diagram(probs, y_te, path)
    print(f"    reliability diagram: {path}")
    print(f"\nIn one line: {summary[0]} and {summary[1]}; {summary[2]}. "
          f"[{time.perf_counter() - t_start:.0f} s]")
    return {"runs": runs, "verdicts": verdicts, "max_difference": diff, "speed": records}


if __name__ == "__main__":
    main()

"""The paper's experiments on offline data, one command each (results and figures go to --out):

    python -m bsam_fast.experiments tune  --dataset mnist --model mlp --epochs 10 --train-subset 12000
    python -m bsam_fast.experiments table --dataset mnist --model mlp --tuned results/mnist_mlp/tuned.json --epochs 30
    python -m bsam_fast.experiments toy2d        # exact posterior vs bSAM vs SAM vs Laplace
    python -m bsam_fast.experiments moons        # predictive uncertainty, SAM vs bSAM
    python -m bsam_fast.experiments rho          # sensitivity to rho, SAM-Adam vs bSAM

`tune` runs the same-size grid of every method on a validation split (``tuning.py``) and
writes tuned.json; `table` (``table.py``) trains each method with its selected hyperparameters on the
whole training set, with several seeds, with the same loop (``training.py``), and writes a
markdown table of mean +- std of accuracy, NLL, ECE (20 bins), misclassification AUROC,
Brier score, OOD AUROC (MNIST vs Fashion-MNIST and back) and time per step, with bSAM's
predictive for 1, 8, 32, 64 samples. Both store every finished run under <out>/runs and,
restarted with the same arguments, run only what is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .baselines import SAM
from .models import MODELS, model_for
from ..optimizer import BSAM
from .table import LABELS, resolve_budget, run_table, write_table
from .training import ABLATIONS, METHODS, Config, evaluate, extra_settings, predictive, train
from .tuning import run_tune


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _report(summary: dict, json_path: str, figure_path: str) -> dict:
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"wrote {figure_path}")
    return summary


def _json_safe(d):
    return {k: v for k, v in d.items() if k != "probs"}

# ------------------------------------------------------------------ toy 2-D logistic regression
def _toy_data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long()
    centers = torch.tensor([[-1.0, -0.6], [1.0, 0.8]], dtype=torch.float64)
    x = centers[y] + 0.9 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, y


def run_toy2d(args):
    """2-parameter logistic regression p(y=1|x) = sigmoid(w.x), prior N(0, 1/(N delta))."""
    plt = _pyplot()
    os.makedirs(args.out, exist_ok=True)
    x, y = _toy_data(seed=args.seed)
    n, delta = len(x), args.prior_precision / len(x)
    ys = y.double() * 2 - 1

    def neg_log_joint(w):  # per example, as the optimisers see it: mean loss + delta/2 |w|^2
        return F.softplus(-ys * (x @ w)).mean() + 0.5 * delta * (w ** 2).sum()

    # exact posterior on a grid (numerical integration)
    L, k = 6.0, 301
    grid = torch.linspace(-L, L, k, dtype=torch.float64)
    W = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    logpost = -n * (F.softplus(-ys[None] * (W @ x.T)).mean(1) + 0.5 * delta * (W ** 2).sum(1))
    post = torch.softmax(logpost, 0)
    # SAM (SGD, full batch) and bSAM (full batch, m = 1)
    def fit(opt_fn, steps):
        w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = opt_fn([w])

        def closure():
            opt.zero_grad()
            loss = F.softplus(-ys * (x @ w)).mean()
            loss.backward()
            return loss
        for _ in range(steps):
            opt.step(closure)
        return w, opt
    w_sam, _ = fit(lambda p: SAM(p, torch.optim.SGD, rho=args.rho, lr=0.5, weight_decay=delta), args.steps)
    w_bsam, opt_b = fit(lambda p: BSAM(p, lr=0.05, num_data=n, rho=args.rho, weight_decay=delta, damping=0.0,
                                       betas=(0.9, 0.999), s_init=1.0, seed=args.seed, backend="reference"),
                        args.steps)
    # Laplace at the SAM solution: covariance (N * Hessian of the per-example objective)^-1
    H = torch.autograd.functional.hessian(neg_log_joint, w_sam.detach())
    cov_laplace = torch.linalg.inv(n * H)
    cov_bsam = torch.diag(opt_b.posterior_std()[0].detach() ** 2)
    mean_exact = (post[:, None] * W).sum(0)
    cov_exact = ((W - mean_exact).T * post) @ (W - mean_exact)

    # predictive p(y=1|x) on an input grid
    g1 = torch.linspace(-4, 4, 121, dtype=torch.float64)
    X = torch.stack(torch.meshgrid(g1, g1, indexing="xy"), -1).reshape(-1, 2)
    gen = torch.Generator().manual_seed(args.seed)

    def mc(mean, cov, s=2000):
        z = torch.randn(s, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + mean
        return torch.sigmoid(X @ z.T).mean(1)
    panels = {"exact posterior": torch.sigmoid(X @ W.T) @ post,
              "bSAM": mc(w_bsam.detach(), cov_bsam),
              "SAM (point estimate)": torch.sigmoid(X @ w_sam.detach()),
              "Laplace at SAM": mc(w_sam.detach(), cov_laplace)}
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8))
    for ax, (name, p) in zip(axes, panels.items()):
        cs = ax.contourf(g1, g1, p.reshape(121, 121), levels=20, cmap="RdBu_r", vmin=0, vmax=1)
        ax.scatter(*x[y == 0].T, c="tab:blue", s=10, edgecolors="k", linewidths=0.3)
        ax.scatter(*x[y == 1].T, c="tab:red", s=10, edgecolors="k", linewidths=0.3)
        ax.set_title(name)
    fig.colorbar(cs, ax=axes[3])
    ax = axes[4]
    ax.contour(grid, grid, post.reshape(k, k).T, levels=6, colors="k", linewidths=0.8)
    for mean, cov, color, name in ((mean_exact, cov_exact, "k", "exact (moments)"), (w_bsam.detach(), cov_bsam, "tab:green", "bSAM"),
                                   (w_sam.detach(), cov_laplace, "tab:orange", "Laplace at SAM")):
        vals, vecs = torch.linalg.eigh(cov)
        t = torch.linspace(0, 2 * math.pi, 100, dtype=torch.float64)
        ell = (vecs @ (2 * vals.sqrt()[:, None] * torch.stack([t.cos(), t.sin()]))).T + mean
        ax.plot(ell[:, 0], ell[:, 1], color=color, label=f"{name} (2 sd)")
    ax.plot(*w_sam.detach(), "o", color="tab:orange", label="SAM solution")
    ax.set_title("posterior over w")
    ax.legend(fontsize=7)
    lim = 3 * cov_exact.diag().sqrt().max().item() + mean_exact.abs().max().item()
    ax.set_xlim(-lim, lim); ax.set_ylim(-lim, lim)
    fig.tight_layout()
    path = os.path.join(args.out, "toy2d.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    summary = {"mean_exact": mean_exact.tolist(), "mean_bsam": w_bsam.detach().tolist(), "w_sam": w_sam.detach().tolist(),
               "std_exact": cov_exact.diag().sqrt().tolist(), "std_bsam": cov_bsam.diag().sqrt().tolist(),
               "std_laplace": cov_laplace.diag().sqrt().tolist()}
    return _report(summary, os.path.join(args.out, "toy2d.json"), path)


# ------------------------------------------------------------------ two moons
def run_moons(args):
    from sklearn.datasets import make_moons
    plt = _pyplot()
    os.makedirs(args.out, exist_ok=True)
    xs, ys = make_moons(n_samples=400, noise=0.15, random_state=args.seed)
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)
    g1 = torch.linspace(-2.5, 3.5, 150)
    g2 = torch.linspace(-2.0, 2.5, 120)
    X = torch.stack(torch.meshgrid(g1, g2, indexing="xy"), -1).reshape(-1, 2)
    panels = {}
    for method in ("sam_adam", "bsam"):
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        hp = {"lr": 0.01} if method == "sam_adam" else {"lr": 0.05}
        cfg = Config(method=method, epochs=args.epochs, batch=40, prior_precision=args.prior_precision,
                     seed=args.seed, backend=args.backend, hparams=hp)
        trained = train(model, cfg, x, y, progress=not args.no_progress, desc=LABELS[method])
        p = predictive(trained, method, X, samples=64, seed=args.seed)
        panels[LABELS[method]] = p.max(1).values
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, conf) in zip(axes, panels.items()):
        cs = ax.contourf(g1, g2, conf.reshape(len(g2), len(g1)), levels=20, cmap="viridis", vmin=0.5, vmax=1)
        ax.scatter(*x[y == 0].T, c="w", s=6, edgecolors="k", linewidths=0.3)
        ax.scatter(*x[y == 1].T, c="tab:red", s=6, edgecolors="k", linewidths=0.3)
        ax.set_title(f"{name}: confidence (max probability)")
    fig.colorbar(cs, ax=axes)
    path = os.path.join(args.out, "moons.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    far = (X.norm(dim=1) > 2.5)
    summary = {name: {"mean_confidence_far_from_data": conf[far].mean().item()} for name, conf in panels.items()}
    return _report(summary, os.path.join(args.out, "moons.json"), path)


# ------------------------------------------------------------------ rho sensitivity
def run_rho(args):
    plt = _pyplot()
    os.makedirs(args.out, exist_ok=True)
    x_tr, y_tr = data.load_train(args.dataset, args.train_subset, args.data_root)
    x_te, y_te = data.load(args.dataset, "test", args.data_root)
    rhos = args.rhos
    curves = {}
    for method in ("sam_adam", "bsam"):
        curves[method] = []
        for rho in rhos:
            torch.manual_seed(args.seed)
            model = model_for(args.model, x_tr)
            cfg = Config(method=method, epochs=args.epochs, batch=args.batch, prior_precision=args.prior_precision,
                         seed=args.seed, backend=args.backend, hparams={"rho": rho},
                         **extra_settings(args.augment, args.data_factor, args.batched_parts))
            trained = train(model, cfg, x_tr, y_tr, progress=not args.no_progress,
                            desc=f"{LABELS[method]} rho={rho}")
            r = evaluate(trained, method, x_te, y_te, samples=args.samples, seed=args.seed)["pred"]
            curves[method].append(_json_safe(r))
            print(f"{LABELS[method]} rho={rho}: acc {r['accuracy']:.4f} nll {r['nll']:.4f} ece {r['ece']:.4f}", flush=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("accuracy", "nll", "ece")):
        for method, rs in curves.items():
            ax.plot(rhos, [r[key] for r in rs], marker="o", label=LABELS[method])
        ax.set_xscale("symlog", linthresh=min(r for r in rhos if r > 0))
        ax.set_xlabel("rho")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(f"{args.dataset}/{args.model}, {args.epochs} epochs")
    fig.tight_layout()
    path = os.path.join(args.out, "rho.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    with open(os.path.join(args.out, "rho.json"), "w") as f:
        json.dump({"rhos": rhos, "curves": curves}, f, indent=1)
    print(f"wrote {path}")
    return curves


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bsam_fast.experiments", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="experiment", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None, help="folder for results and figures")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--backend", default="auto")
    common.add_argument("--prior-precision", type=float, default=None,
                        help="default 10 (moons: 1; tune: in the grid)")
    common.add_argument("--no-progress", action="store_true")
    data_args = argparse.ArgumentParser(add_help=False)
    data_args.add_argument("--dataset", default="mnist", choices=["digits", "mnist", "fashion_mnist", "cifar10", "cifar100"])
    data_args.add_argument("--data-root", default=None, help="folder of CIFAR's python-pickle files")
    data_args.add_argument("--model", default="mlp", choices=list(MODELS))
    data_args.add_argument("--epochs", type=int, default=None, help="default 5 (table --tuned: the tuner's)")
    data_args.add_argument("--batch", type=int, default=None, help="default 128 (table --tuned: the tuner's)")
    data_args.add_argument("--samples", type=int, default=None,
                           help="posterior samples in the predictive of bSAM, IVON and SWAG (default "
                                "32; tune: 8)")
    data_args.add_argument("--train-subset", type=int, default=0, help="use only the first N training examples")
    data_args.add_argument("--augment", action="store_true",
                           help="random crops and horizontal flips of each batch (CIFAR, the paper's Table 2); "
                                "N is multiplied by --data-factor")
    data_args.add_argument("--data-factor", type=float, default=None,
                           help="with --augment: N = this x the training examples (default 4, the authors' dafactor)")
    data_args.add_argument("--batched-parts", action="store_true",
                           help="bSAM's m parts with their passes batched by vmap (bsam_fast.func.step_batched)")
    data_args.add_argument("--warmup-epochs", type=float, default=None,
                           help="linear warm-up, then cosine; default 1 (table --tuned: the tuner's)")
    all_methods = list(METHODS + ABLATIONS)
    tu = sub.add_parser("tune", parents=[common, data_args], help="grid search on a validation split")
    tu.add_argument("--methods", nargs="+", default=all_methods, choices=all_methods)
    tu.add_argument("--val-fraction", type=float, default=0.1)
    tu.add_argument("--quick", action="store_true", help="2 configurations per method (smoke test)")
    tu.add_argument("--max-shifts", type=int, default=6,
                    help="how many times a learning-rate axis may move away from an edge selection")
    t = sub.add_parser("table", parents=[common, data_args], help="metric table, tuned methods, several seeds")
    t.add_argument("--tuned", default=None, help="tuned.json written by `tune` (else the defaults)")
    t.add_argument("--methods", nargs="+", default=None, choices=all_methods)
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument("--sample-counts", nargs="*", type=int, default=[1, 8, 32, 64],
                   help="bSAM's predictive with these numbers of samples too (Table 4)")
    t.add_argument("--m", type=int, default=None, help="default 1")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--rho", type=float, default=None)
    t.add_argument("--set", nargs="*", help="per-method hyperparameters, e.g. bsam.lr=0.2 sam_adam.rho=0.1")
    toy = sub.add_parser("toy2d", parents=[common], help="2-D Bayesian logistic regression")
    toy.add_argument("--rho", type=float, default=0.05)
    toy.add_argument("--steps", type=int, default=3000)
    moons = sub.add_parser("moons", parents=[common], help="two moons: SAM vs bSAM uncertainty")
    moons.add_argument("--epochs", type=int, default=600)
    rho = sub.add_parser("rho", parents=[common, data_args], help="sensitivity to rho")
    rho.add_argument("--rhos", nargs="+", type=float, default=[0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    rep = sub.add_parser("report", help="rewrite table.md of a table run from its results.json")
    rep.add_argument("folder")
    args = ap.parse_args(argv)
    if getattr(args, "data_factor", None) is not None and not args.augment:
        ap.error("--data-factor scales N for --augment; it does nothing without it")
    if args.experiment == "report":
        text = write_table(args.folder)
        print(text)
        return text
    if getattr(args, "samples", 0) is None:
        args.samples = 8 if args.experiment == "tune" else 32
    if args.experiment != "table":
        if args.prior_precision is None:     # (not set_defaults: it would change the shared option)
            args.prior_precision = 1.0 if args.experiment == "moons" else 10.0
        resolve_budget(args, {})
    if args.out is None:
        args.out = os.path.join("results", args.experiment if args.experiment not in ("table", "tune")
                                else f"{args.dataset}_{args.model}")
    return {"table": run_table, "tune": run_tune, "toy2d": run_toy2d, "moons": run_moons,
            "rho": run_rho}[args.experiment](args)

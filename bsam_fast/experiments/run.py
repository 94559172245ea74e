"""The paper's experiments on offline data, one command each (results and figures go to --out):

    python -m bsam_fast.experiments tune  --dataset mnist --model mlp --epochs 3 --train-subset 10000
    python -m bsam_fast.experiments table --dataset mnist --model mlp --tuned results/mnist_mlp/tuned.json
    python -m bsam_fast.experiments toy2d        # exact posterior vs bSAM vs SAM vs Laplace
    python -m bsam_fast.experiments moons        # predictive uncertainty, SAM vs bSAM
    python -m bsam_fast.experiments rho          # sensitivity to rho, SAM-Adam vs bSAM

`tune` runs the same-size grid of every method on a validation split (``tuning.py``) and
writes tuned.json; `table` trains each method with its selected hyperparameters on the
whole training set, with several seeds, with the same loop (``training.py``), and writes a
markdown table of mean +- std of accuracy, NLL, ECE (20 bins), misclassification AUROC,
Brier score, OOD AUROC (MNIST vs Fashion-MNIST and back) and time per step, with bSAM's
predictive for 1, 8, 32, 64 samples.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import metrics
from . import data
from .baselines import SAM
from .models import make_model
from ..optimizer import BSAM
from .training import ABLATIONS, DEFAULTS, METHODS, Config, evaluate, predictive, train
from .tuning import config_from, run_tune

OOD_PARTNER = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}
LABELS = {"sgd": "SGD", "adam": "Adam", "sam_sgd": "SAM-SGD", "sam_adam": "SAM-Adam", "bsam": "bSAM",
          "ivon": "IVON", "swag": "SWAG", "laplace": "Laplace (at SGD)", "bsam_nonoise": "bSAM without noise"}


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


def _load_train(args):
    x_tr, y_tr = data.load(args.dataset, "train", args.data_root)
    if args.train_subset:
        x_tr, y_tr = x_tr[:args.train_subset], y_tr[:args.train_subset]
    return x_tr, y_tr


METRIC_KEYS = ("accuracy", "nll", "ece", "auroc", "brier", "ood_auroc")


def _mean_std(values: list[float]) -> dict:
    """Mean and std over the seeds whose value is finite (n of them; a diverged run, or an
    undefined AUROC, is left out and shows in n and runs)."""
    t = torch.tensor(values, dtype=torch.float64)
    ok = t[torch.isfinite(t)]
    return {"mean": ok.mean().item() if len(ok) else math.nan,
            "std": ok.std().item() if len(ok) > 1 else 0.0, "n": len(ok), "runs": values}


def run_table(args) -> dict:
    """Each method with its tuned hyperparameters (``--tuned tuned.json``, else the
    defaults), trained on the whole training set with every seed; mean +- std."""
    os.makedirs(args.out, exist_ok=True)
    x_tr, y_tr = _load_train(args)
    x_te, y_te = data.load(args.dataset, "test", args.data_root)
    x_ood = None
    if args.dataset in OOD_PARTNER:
        try:
            x_ood = data.load(OOD_PARTNER[args.dataset], "test")[0]
        except data.DatasetNotFound as exc:
            print(f"(no OOD AUROC: {exc})")
    tuned = None
    if args.tuned:
        with open(args.tuned) as f:
            tuned = json.load(f)
        given = [flag for flag, value in (("--lr", args.lr), ("--rho", args.rho), ("--set", args.set),
                                          ("--m", args.m), ("--prior-precision", args.prior_precision))
                 if value is not None]
        if given:
            raise SystemExit(f"--tuned sets the hyperparameters: {', '.join(given)} would be ignored")
    _resolve_budget(args, tuned["protocol"] if tuned else {})
    methods = args.methods or (list(tuned["selected"]) if tuned else list(METHODS))
    results, probs_for_plot = {}, {}
    for method in methods:
        if tuned is not None and method not in tuned["selected"]:
            raise SystemExit(f"--tuned {args.tuned} has no selection for {method}")
        choice = tuned["selected"][method]["hparams"] if tuned else \
            {"prior_precision": 10.0 if args.prior_precision is None else args.prior_precision,
             "m": 1 if args.m is None else args.m, **_hparams(args, method)}
        runs = {"pred": [], "mean": [], "ms_per_step": [], "samples": {}}
        for seed in args.seeds:
            cfg = config_from(method, choice, epochs=args.epochs,
                              batch=args.batch, seed=seed, backend=args.backend, warmup_epochs=args.warmup_epochs)
            torch.manual_seed(seed)
            trained = train(_model_for(args.model, x_tr), cfg, x_tr, y_tr, progress=not args.no_progress,
                            desc=f"{LABELS[method]} seed {seed}")
            res = evaluate(trained, method, x_te, y_te, samples=args.samples, seed=seed, x_ood=x_ood)
            runs["pred"].append(_json_safe(res["pred"]))
            runs["mean"].append(_json_safe(res["mean"]))
            runs["ms_per_step"].append(trained.ms_per_step)
            if method in ("bsam", "bsam_nonoise") and args.sample_counts:
                for s in args.sample_counts:       # the paper's Table 4: samples in the predictive
                    probs = predictive(trained, method, x_te, samples=s, seed=seed)
                    runs["samples"].setdefault(str(s), []).append(metrics.all_metrics(probs, y_te))
            if seed == args.seeds[0]:
                probs_for_plot[LABELS[method]] = res["pred"]["probs"]
            print(f"{LABELS[method]} seed {seed}: acc {res['pred']['accuracy']:.4f} nll {res['pred']['nll']:.4f} "
                  f"({trained.ms_per_step:.1f} ms/step)", flush=True)
        results[method] = {"hparams": choice, "ms_per_step": _mean_std(runs["ms_per_step"]),
                           **{kind: {k: _mean_std([r[k] for r in runs[kind]]) for k in METRIC_KEYS
                                     if k in runs[kind][0]} for kind in ("pred", "mean")},
                           "samples": {s: {k: _mean_std([r[k] for r in rs]) for k in rs[0]}
                                       for s, rs in runs["samples"].items()}}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "train_examples": len(x_tr), "results": results}, f, indent=1)
    print(write_table(args.out))
    metrics.reliability_diagram(probs_for_plot, y_te, os.path.join(args.out, "reliability.png"))
    return results


def _resolve_budget(args, protocol: dict) -> None:
    """Epochs, batch and warm-up: as given, else the tuner's (--tuned), else the defaults."""
    for name, default in (("epochs", 5), ("batch", 128), ("warmup_epochs", 1.0)):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, protocol.get(name, default))


def write_table(folder: str) -> str:
    """table.md of a table run, from its results.json: the metrics (mean ± std over the
    seeds) and bSAM's predictive with 1, 8, 32, 64 samples (the paper's Table 4)."""
    with open(os.path.join(folder, "results.json")) as f:
        saved = json.load(f)
    args, results = saved["args"], saved["results"]
    ood = any("ood_auroc" in r["pred"] for r in results.values())
    header = (f"{args['dataset']} / {args['model']}: {saved.get('train_examples', '?')} training examples, "
              f"{args['epochs']} epochs (warm-up {args['warmup_epochs']}), batch {args['batch']}, seeds "
              f"{args['seeds']}, {args['samples']} samples in the sampled predictives; hyperparameters "
              f"{'from ' + args['tuned'] if args.get('tuned') else 'defaults'}")
    text = header + "\n\n" + _markdown_table(results, ood)
    samples = {m: r["samples"] for m, r in results.items() if r.get("samples")}
    if samples:
        lines = ["| method | samples | accuracy (%) | NLL | ECE |", "|---|---|---|---|---|"]
        for method, by_count in samples.items():
            for count, stats in by_count.items():
                lines.append(f"| {LABELS[method]} | {count} | {_cell(stats['accuracy'], 100.0)} | "
                             f"{_cell(stats['nll'])} | {_cell(stats['ece'])} |")
        text += "\n\nPosterior samples in the predictive:\n\n" + "\n".join(lines)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    return text


def _cell(stat: dict, scale: float = 1.0) -> str:
    digits = 2 if scale > 1 else 4
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _markdown_table(results: dict, ood: bool) -> str:
    keys = ["accuracy", "nll", "ece", "auroc", "brier"] + (["ood_auroc"] if ood else [])
    names = {"accuracy": "accuracy (%)", "nll": "NLL", "ece": "ECE", "auroc": "AUROC", "brier": "Brier",
             "ood_auroc": "OOD AUROC"}
    head = "| method | " + " | ".join(names[k] for k in keys) + " | ms/step |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for method, r in results.items():
        rows = [(LABELS[method], r["pred"])]
        if method in ("bsam", "bsam_nonoise", "swag", "ivon"):
            rows.append((f"{LABELS[method]} at mean", r["mean"]))
        ms = r["ms_per_step"]
        for name, stats in rows:
            cells = [_cell(stats[k], 100.0 if k == "accuracy" else 1.0) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ms['mean']:.1f} ± {ms['std']:.1f} |")
    return "\n".join(lines)


def _model_for(name: str, x) -> nn.Module:
    """The named model, sized for inputs like x (the MLP takes any flattened size)."""
    if name == "mlp":
        return make_model(name, in_features=x[0].numel())
    return make_model(name, in_channels=x.shape[1])


def _hparams(args, method) -> dict:
    hp = {}
    if args.lr is not None:
        hp["lr"] = args.lr
    if args.rho is not None and "rho" in DEFAULTS[method]:
        hp["rho"] = args.rho
    for item in args.set or []:              # --set bsam.lr=0.2
        key, value = item.split("=", 1)
        m, name = key.split(".", 1)
        if m == method:
            hp[name] = float(value)
    return hp


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
    x_tr, y_tr = _load_train(args)
    x_te, y_te = data.load(args.dataset, "test", args.data_root)
    rhos = args.rhos
    curves = {}
    for method in ("sam_adam", "bsam"):
        curves[method] = []
        for rho in rhos:
            torch.manual_seed(args.seed)
            model = _model_for(args.model, x_tr)
            cfg = Config(method=method, epochs=args.epochs, batch=args.batch, prior_precision=args.prior_precision,
                         seed=args.seed, backend=args.backend, hparams={"rho": rho})
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
    data_args.add_argument("--model", default="mlp", choices=["mlp", "lenet5", "resnet20_frn", "resnet18"])
    data_args.add_argument("--epochs", type=int, default=None, help="default 5 (table --tuned: the tuner's)")
    data_args.add_argument("--batch", type=int, default=None, help="default 128 (table --tuned: the tuner's)")
    data_args.add_argument("--samples", type=int, default=None,
                           help="posterior samples in the predictive of bSAM, IVON and SWAG (default "
                                "32; tune: 8)")
    data_args.add_argument("--train-subset", type=int, default=0, help="use only the first N training examples")
    data_args.add_argument("--warmup-epochs", type=float, default=None,
                           help="linear warm-up, then cosine; default 1 (table --tuned: the tuner's)")
    all_methods = list(METHODS + ABLATIONS)
    tu = sub.add_parser("tune", parents=[common, data_args], help="grid search on a validation split")
    tu.add_argument("--methods", nargs="+", default=all_methods, choices=all_methods)
    tu.add_argument("--val-fraction", type=float, default=0.1)
    tu.add_argument("--quick", action="store_true", help="2 configurations per method (smoke test)")
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
    if args.experiment == "report":
        text = write_table(args.folder)
        print(text)
        return text
    if getattr(args, "samples", 0) is None:
        args.samples = 8 if args.experiment == "tune" else 32
    if args.experiment != "table":
        if args.prior_precision is None:     # (not set_defaults: it would change the shared option)
            args.prior_precision = 1.0 if args.experiment == "moons" else 10.0
        _resolve_budget(args, {})
    if args.out is None:
        args.out = os.path.join("results", args.experiment if args.experiment not in ("table", "tune")
                                else f"{args.dataset}_{args.model}")
    return {"table": run_table, "tune": run_tune, "toy2d": run_toy2d, "moons": run_moons,
            "rho": run_rho}[args.experiment](args)

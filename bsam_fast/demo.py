"""Main job: train Adam and bSAM on scikit-learn's digits and compare accuracy and NLL.

    python -m bsam_fast.demo [--epochs 30] [--seed 0] [--backend auto]

bSAM is evaluated at the posterior mean and by Bayesian model averaging over
``--samples`` posterior samples (softmax probabilities averaged).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BSAM


def load_digits_split(seed: int = 0):
    """Digits (1797 8x8 images), standardised, 80/20 split; tensors (x_tr, y_tr, x_te, y_te)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def mlp(seed: int, width: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


@torch.no_grad()
def evaluate(probs: torch.Tensor, y: torch.Tensor) -> dict:
    return {"acc": (probs.argmax(1) == y).float().mean().item(),
            "nll": F.nll_loss(probs.clamp_min(1e-12).log(), y).item()}


def train(name, model, opt, x, y, epochs, batch, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    steps, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                return loss
            opt.step(closure)
            steps += 1
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    n = len(x_tr)
    rows = []

    model = mlp(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    ms = train("Adam", model, opt, x_tr, y_tr, args.epochs, args.batch, args.seed)
    with torch.no_grad():
        rows.append(("Adam", evaluate(model(x_te).softmax(1), y_te), ms))

    model = mlp(args.seed)
    opt = BSAM(model.parameters(), lr=0.1, num_data=n, rho=0.01, weight_decay=10.0 / n,
               damping=0.1, backend=args.backend, seed=args.seed)
    ms = train("bSAM", model, opt, x_tr, y_tr, args.epochs, args.batch, args.seed)
    with torch.no_grad():
        rows.append((f"bSAM ({opt.backend}) at mean", evaluate(model(x_te).softmax(1), y_te), ms))
        g = torch.Generator().manual_seed(args.seed)
        probs = torch.zeros(len(x_te), 10)
        for _ in range(args.samples):
            with opt.sampled_params(generator=g):
                probs += model(x_te).softmax(1) / args.samples
        rows.append((f"bSAM ({opt.backend}) BMA S={args.samples}", evaluate(probs, y_te), ms))

    print(f"digits: {n} train / {len(x_te)} test, {args.epochs} epochs, batch {args.batch}")
    print(f"{'method':<32} {'accuracy':>9} {'NLL':>8} {'ms/step':>8}")
    for name, metrics, ms in rows:
        print(f"{name:<32} {metrics['acc']:>9.4f} {metrics['nll']:>8.4f} {ms:>8.2f}")
    return rows


if __name__ == "__main__":
    main()

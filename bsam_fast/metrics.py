"""Metrics of predictive uncertainty, as in the paper's tables.

All functions take class probabilities ``probs`` of shape (N, C) (already averaged over
posterior samples for Bayesian model averaging) and integer labels ``y`` of shape (N,).

ECE bins: 20 equal-width bins of the confidence (the largest probability) with edges
0, 0.05, ..., 1.0; bin b holds confidences in [b/20, (b+1)/20), the last bin also 1.0,
so a confidence on a boundary falls in exactly one bin (the one it opens).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ECE_BINS = 20
HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False, "auroc": True, "brier": False,
                    "ood_auroc": True}


def _check(probs: Tensor, y: Optional[Tensor] = None) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if y is not None and y.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {tuple(y.shape)}")


def accuracy(probs: Tensor, y: Tensor) -> float:
    _check(probs, y)
    return (probs.argmax(1) == y).double().mean().item()


def nll(probs: Tensor, y: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels under the (averaged) probabilities."""
    _check(probs, y)
    return -probs.double().gather(1, y[:, None]).clamp_min(eps).log().mean().item()


def brier(probs: Tensor, y: Tensor) -> float:
    """Mean over examples of sum_c (p_c - 1[c = y])^2."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).double()
    return (probs.double() - onehot).pow(2).sum(1).mean().item()


def ece_bin_index(confidence: Tensor, bins: int = ECE_BINS) -> Tensor:
    """Bin of each confidence: floor(conf * bins), with 1.0 in the last bin."""
    return (confidence.double() * bins).floor().long().clamp(0, bins - 1)


def reliability(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> dict:
    """Per bin: count, mean confidence and accuracy (NaN for empty bins)."""
    _check(probs, y)
    conf, pred = probs.double().max(1)
    correct = (pred == y).double()
    index = ece_bin_index(conf, bins)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return {"count": count, "confidence": conf_sum / count, "accuracy": acc_sum / count,
            "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64)}


def ece(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum_b (n_b / N) |accuracy_b - confidence_b|."""
    return ece_of(reliability(probs, y, bins))


def ece_of(r: dict) -> float:
    """The ECE of a ``reliability()`` (tensors or lists)."""
    count, acc, conf = (torch.as_tensor(r[k], dtype=torch.float64) for k in ("count", "accuracy", "confidence"))
    filled = count > 0
    return (count[filled] / count.sum() * (acc[filled] - conf[filled]).abs()).sum().item()


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores higher than
    a random negative, ties counting one half (Mann-Whitney U / (n_pos * n_neg))."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative example")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    ranks[order] = (rank_sums / counts)[inverse]
    u = ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def misclassification_auroc(probs: Tensor, y: Tensor) -> float:
    """How well the confidence separates correct from wrong predictions (the paper's AUROC)."""
    _check(probs, y)
    conf, pred = probs.max(1)
    return auroc(conf, pred == y)


def ood_auroc(probs_in: Tensor, probs_out: Tensor) -> float:
    """How well the confidence separates in-distribution (positive) from OOD inputs."""
    _check(probs_in)
    _check(probs_out)
    scores = torch.cat([probs_in.max(1).values, probs_out.max(1).values])
    positive = torch.cat([torch.ones(len(probs_in)), torch.zeros(len(probs_out))])
    return auroc(scores, positive)


def all_metrics(probs: Tensor, y: Tensor) -> dict:
    """Accuracy, NLL, ECE, misclassification AUROC (NaN when every prediction is right, or
    every one wrong: the AUROC is then undefined) and Brier score."""
    try:
        auc = misclassification_auroc(probs, y)
    except ValueError:
        auc = float("nan")
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y),
            "auroc": auc, "brier": brier(probs, y)}


def reliability_diagram(probs_by_name: dict, y: Tensor, path: str, bins: int = ECE_BINS) -> None:
    """PNG: accuracy against confidence per bin, one panel per method."""
    reliability_diagram_of({name: reliability(probs, y, bins) for name, probs in probs_by_name.items()}, path)


def reliability_diagram_of(reliabilities: dict, path: str) -> None:
    """PNG: one panel per method from its ``reliability()`` (tensors or lists), with its ECE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(reliabilities)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False)
    for ax, (name, r) in zip(axes[0], reliabilities.items()):
        ece_value = ece_of(r)
        r = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in r.items()}
        bins = len(r["count"])
        centers = ((r["edges"][:-1] + r["edges"][1:]) / 2).numpy()
        acc = torch.nan_to_num(r["accuracy"], nan=0.0).numpy()
        ax.bar(centers, acc, width=1 / bins, edgecolor="k", linewidth=0.4, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", linewidth=1, label="perfect calibration")
        ax.set_title(f"{name}\nECE {ece_value:.4f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def compare(ours: dict, theirs: dict, keys=("accuracy", "nll", "ece", "auroc")) -> dict:
    """Per metric of `keys`: "better", "worse" or "equal" (the means differ by no more than
    the sum of the two standard deviations over the seeds) for `ours` against `theirs`
    (lists of per-seed values); "undefined" if a value is not finite (an AUROC with no
    error, a diverged run)."""
    out = {}
    for k in keys:
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

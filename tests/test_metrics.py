"""Metrics against small hand-computed cases."""
import math

import pytest
import torch

from bsam_fast import metrics

P = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]], dtype=torch.float64)
Y = torch.tensor([0, 1, 1, 0])
# predictions 0, 0, 1, 0 -> correct, wrong, correct, correct; confidences .9 .6 .7 .55


def test_accuracy_nll_brier():
    assert metrics.accuracy(P, Y) == 0.75
    assert metrics.nll(P, Y) == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.55)) / 4)
    brier = ((0.1 ** 2 + 0.1 ** 2) + (0.6 ** 2 + 0.6 ** 2) + (0.3 ** 2 + 0.3 ** 2) + (0.45 ** 2 + 0.45 ** 2)) / 4
    assert metrics.brier(P, Y) == pytest.approx(brier)


def test_ece_by_hand():
    # 20 bins of width 0.05: .9 -> bin 18, .6 -> 12, .7 -> 14, .55 -> 11; one example each
    gaps = [abs(1 - 0.9), abs(0 - 0.6), abs(1 - 0.7), abs(1 - 0.55)]
    assert metrics.ece(P, Y) == pytest.approx(sum(gaps) / 4)
    # two examples sharing a bin average first: conf .9 and .92 (bin 18), one right, one wrong
    p = torch.tensor([[0.9, 0.1], [0.92, 0.08]], dtype=torch.float64)
    assert metrics.ece(p, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.91))


def test_ece_bin_boundaries_fall_in_exactly_one_bin():
    conf = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.95, 1.0], dtype=torch.float64)
    assert metrics.ece_bin_index(conf).tolist() == [0, 1, 2, 10, 19, 19]
    r = metrics.reliability(torch.stack([conf, 1 - conf], 1).clamp(0, 1), torch.zeros(6, dtype=torch.long))
    assert r["count"].sum() == 6
    assert r["edges"][1].item() == pytest.approx(0.05) and len(r["edges"]) == 21


def test_auroc_by_hand_with_ties():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3])
    positive = torch.tensor([1, 0, 1, 0])
    # pairs (pos, neg): (.9,.8)=1 (.9,.3)=1 (.8,.8)=.5 (.8,.3)=1 -> 3.5 / 4
    assert metrics.auroc(scores, positive) == pytest.approx(0.875)
    assert metrics.auroc(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])) == 1.0
    with pytest.raises(ValueError, match="positive and one negative"):
        metrics.auroc(torch.tensor([1.0]), torch.tensor([1]))


def test_misclassification_and_ood_auroc():
    # correct ones have confidence .9, .7, .55; the wrong one .6 -> pairs: 1, 1, 0 -> 2/3
    assert metrics.misclassification_auroc(P, Y) == pytest.approx(2 / 3)
    p_in = torch.tensor([[0.95, 0.05], [0.2, 0.8]])
    p_out = torch.tensor([[0.5, 0.5], [0.85, 0.15]])
    # in-confidence .95 .8 vs out .5 .85: pairs (.95>.5,.95>.85,.8>.5,.8<.85) -> 3/4
    assert metrics.ood_auroc(p_in, p_out) == pytest.approx(0.75)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.nll(P, torch.zeros(2, dtype=torch.long))


def test_reliability_diagram_png(tmp_path):
    path = tmp_path / "r.png"
    metrics.reliability_diagram({"a": P, "b": P.flip(1)}, Y, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def _random_predictions(seed, n=2000, classes=10):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, classes, generator=g, dtype=torch.float64), 1)
    y = torch.where(torch.rand(n, generator=g) < 0.7, probs.argmax(1), torch.randint(0, classes, (n,), generator=g))
    return probs, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_torchmetrics(seed):
    """torchmetrics (a maintained implementation) as the reference. ECE: torchmetrics bins a
    confidence c into bucketize(c, interior edges, right=True): a confidence exactly on an
    edge k/20 goes to the bin below, ours (floor(20c)) to the bin above; the random
    confidences here never sit on an edge, so the two agree to rounding."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, y = _random_predictions(seed)
    classes = probs.shape[1]
    assert metrics.accuracy(probs, y) == pytest.approx(
        tm.multiclass_accuracy(probs, y, num_classes=classes, average="micro").item(), abs=1e-6)  # float32
    assert metrics.ece(probs, y) == pytest.approx(
        tm.multiclass_calibration_error(probs, y, num_classes=classes, n_bins=metrics.ECE_BINS, norm="l1").item(),
        abs=1e-6)
    conf, pred = probs.max(1)
    assert metrics.misclassification_auroc(probs, y) == pytest.approx(
        tm.binary_auroc(conf, (pred == y).long()).item(), abs=1e-6)
    other, _ = _random_predictions(seed + 10, n=700)
    scores = torch.cat([probs.max(1).values, other.max(1).values])
    labels = torch.cat([torch.ones(len(probs)), torch.zeros(len(other))]).long()
    assert metrics.ood_auroc(probs, other) == pytest.approx(tm.binary_auroc(scores, labels).item(), abs=1e-6)
    assert metrics.nll(probs, y) == pytest.approx(
        torch.nn.functional.nll_loss(probs.log(), y).item(), abs=1e-12)

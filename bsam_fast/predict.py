"""Predictions with a model trained by BSAM: at the posterior mean, and Bayesian model
averaging over posterior samples w + xi / sqrt(N * s)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from . import sharded
from .optimizer import BSAM


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() inside (BatchNorm uses its running statistics), the old mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _softmax(logits: Tensor) -> Tensor:
    """Probabilities in float32, or float64 for a float64 model (never below float32)."""
    return logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def probabilities(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Softmax probabilities of the model as it is (mode and parameters), in batches."""
    # FSDP2 keeps the root module's parameters gathered after a forward pass without
    # backward: reshard before and after, so that every forward here gathers the shards as
    # they are (the sample or the mean written into them).
    sharded.reshard_model(model)
    out = [_softmax(model(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    sharded.reshard_model(model)
    return torch.cat(out)


@torch.no_grad()
def predict_mean(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Class probabilities at the current parameters (the mean, between bSAM steps)."""
    with eval_mode(model):
        return probabilities(model, x, batch_size)


@torch.no_grad()
def predict_bma(model: nn.Module, optimizer: BSAM, x: Tensor, samples: int = 32,
                generator: Optional[torch.Generator] = None, batch_size: int = 1024) -> Tensor:
    """Bayesian model averaging: softmax probabilities averaged over `samples` posterior
    samples (each drawn into the model by ``optimizer.sampled_params``; the mean is put
    back afterwards). The NLL of these averaged probabilities is the predictive NLL."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in owned for p in model.parameters()):
        raise ValueError("predict_bma: none of the model's parameters is the optimizer's, so the "
                         "posterior samples would not reach it (a copy such as AveragedModel or a "
                         "deepcopy?). Pass the module whose parameters the optimizer trains.")
    total = None
    with eval_mode(model):
        for _ in range(samples):
            with optimizer.sampled_params(generator=generator):
                probs = probabilities(model, x, batch_size)
            total = probs if total is None else total + probs
    return total / samples

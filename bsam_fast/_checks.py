"""Validation of what users hand to ``BSAM``: hyperparameters, parameters, noise and
gradients. Every check raises an error that names the offending value, before anything
is changed."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def check_hyperparameters(group: dict) -> None:
    """ValueError naming the first invalid hyperparameter of a param group."""
    lr = group["lr"]
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a float or a one-element tensor, got shape {tuple(lr.shape)}")
    if not lr_value >= 0.0:
        raise ValueError(f"Invalid lr: {lr_value} (must be >= 0)")
    if not group["num_data"] > 0:
        raise ValueError(f"Invalid num_data: {group['num_data']} (must be > 0: the number "
                         "of training examples N)")
    rho = group["rho"]
    if isinstance(rho, Tensor) and rho.numel() != 1:
        raise ValueError(f"rho must be a float or a one-element tensor, got shape {tuple(rho.shape)}")
    if not (rho.item() if isinstance(rho, Tensor) else rho) >= 0.0:
        raise ValueError(f"Invalid rho: {rho} (must be >= 0)")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta{i + 1} (betas[{i}]): {beta} (must be in [0, 1))")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']} (must be >= 0)")
    if not group["damping"] >= 0.0:
        raise ValueError(f"Invalid damping: {group['damping']} (must be >= 0)")
    if not group["s_init"] > 0.0:
        raise ValueError(f"Invalid s_init: {group['s_init']} (must be > 0)")


def check_parameter(p: Tensor) -> None:
    if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
        raise ValueError("BSAM does not support sharded DTensor parameters (FSDP2 "
                         "fully_shard, tensor parallelism): bSAM keeps per-element state and "
                         "noise indexed over whole tensors. Use DistributedDataParallel with "
                         "BSAM(..., process_group=...) instead (see README).")
    if p.is_complex():
        raise ValueError("BSAM does not support complex parameters (got dtype "
                         f"{p.dtype}); use torch.view_as_real to optimise the real parts")
    if not p.is_floating_point():
        raise ValueError(f"BSAM only optimises floating-point parameters, got dtype {p.dtype}")
    if p.is_sparse:
        raise ValueError("BSAM does not support sparse parameters")


def check_noise(noise: Sequence[Tensor], params: list[Tensor]) -> list[Tensor]:
    """noise given to sample_noise(): one floating tensor per parameter, its shape and device."""
    noise = list(noise)
    if len(noise) != len(params):
        raise ValueError(f"noise: expected {len(params)} tensors (one per parameter), got {len(noise)}")
    for i, (xi, p) in enumerate(zip(noise, params)):
        if not isinstance(xi, Tensor) or xi.shape != p.shape:
            raise ValueError(f"noise[{i}]: expected a tensor of shape {tuple(p.shape)}, "
                             f"got {getattr(xi, 'shape', type(xi).__name__)}")
        if not xi.is_floating_point():
            raise ValueError(f"noise[{i}]: expected a floating-point tensor, got {xi.dtype}")
        if xi.device != p.device:
            raise ValueError(f"noise[{i}]: expected device {p.device}, got {xi.device}")
    return noise


def check_gradients(params: list[Tensor]) -> list[Tensor]:
    """The gradients of `params` (each has one), or a RuntimeError naming what is wrong."""
    grads = []
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("BSAM does not support sparse gradients; use a dense "
                               "gradient (e.g. nn.Embedding(sparse=False))")
        if p.grad.is_complex() or p.grad.shape != p.shape:
            raise RuntimeError(f"gradient of shape {tuple(p.grad.shape)} / dtype "
                               f"{p.grad.dtype} does not match its parameter "
                               f"{tuple(p.shape)} / {p.dtype}")
        grads.append(p.grad)
    return grads

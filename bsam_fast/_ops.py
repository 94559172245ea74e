"""Thin Python wrappers of the ``bsam_fast`` ops (schemas: ``csrc/ops.cpp``).

Loading ``bsam_fast._C`` registers the ops and their CPU (and CUDA) kernels. The fake
implementations below let ``torch.compile`` and ``torch.library.opcheck`` trace them:
every op mutates its arguments in place and returns nothing.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (registers torch.ops.bsam_fast.*)
    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # no compiler at install time, or a torch/ABI mismatch
    LOAD_ERROR = str(exc) or exc.__class__.__name__

_warned = False


def is_loaded() -> bool:
    return LOAD_ERROR is None


def warn_once_unavailable() -> None:
    """Say once that the compiled kernels are missing and what runs instead."""
    global _warned
    if not _warned and LOAD_ERROR is not None:
        _warned = True
        warnings.warn("bsam_fast: compiled kernels not available (" + LOAD_ERROR.splitlines()[0]
                      + "); using the 'foreach' backend. Reinstall with a C++ compiler and "
                      "`pip install --no-build-isolation .` to build them.", RuntimeWarning,
                      stacklevel=3)


def has_kernel(device_type: str) -> bool:
    """True if the ops have kernels for this device type ('cpu', 'cuda')."""
    if not is_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("bsam_fast::update_", key)


def to_signed64(x: int) -> int:
    """Pass a uint64 (seed, offset) through an int64 schema argument."""
    return x - (1 << 64) if x >= (1 << 63) else x


if is_loaded():
    for _name in ("sample_", "perturb_", "check_finite_", "update_", "normal_"):
        torch.library.register_fake(f"bsam_fast::{_name}")(lambda *args, **kwargs: None)


def sample_(params, means, precisions, bases, num_data, seed, offset, load_mean,
            noise: Optional[Sequence[Tensor]] = None, offset_tensor: Optional[Tensor] = None) -> None:
    torch.ops.bsam_fast.sample_(params, means, precisions, list(bases), float(num_data),
                                to_signed64(seed), to_signed64(offset), load_mean,
                                None if noise is None else list(noise), offset_tensor)


def perturb_(params, grads, means, precisions, u_sums, rho, inv_scale, first_part,
             found_inf) -> None:
    """rho may be a Python number or a one-element tensor on the device."""
    rho_tensor = rho.to(device=params[0].device, dtype=torch.float64) if isinstance(rho, Tensor) else None
    torch.ops.bsam_fast.perturb_(params, grads, means, precisions, u_sums,
                                 0.0 if rho_tensor is not None else float(rho),
                                 inv_scale, first_part, found_inf, rho_tensor)


def check_finite_(tensors, found_inf, like: Optional[Sequence[Tensor]] = None) -> None:
    """like: the parameters the tensors (gradients) must match in dtype, shape and device."""
    torch.ops.bsam_fast.check_finite_(tensors, found_inf, None if like is None else list(like))


def update_(params, means, momenta, precisions, grads, u_sums, grad_factor, u_factor, lr,
            beta1, beta2, weight_decay, damping, write_mean, skip_if: Optional[Tensor] = None) -> None:
    """grad_factor and lr may be Python numbers or one-element tensors on the device; both
    kernels read tensors as float64 (lr and rho too), the precision of the arithmetic for
    float64 parameters."""
    factor_tensor = grad_factor.to(dtype=torch.float64) if isinstance(grad_factor, Tensor) else None
    factor = 1.0 if factor_tensor is not None else float(grad_factor)
    lr_tensor = lr.to(device=params[0].device, dtype=torch.float64) if isinstance(lr, Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    torch.ops.bsam_fast.update_(params, means, momenta, precisions, grads, u_sums,
                                factor_tensor, factor, float(u_factor), lr_value, float(beta1),
                                float(beta2), float(weight_decay), float(damping), write_mean,
                                lr_tensor, skip_if)


def normal(tensors: Sequence[Tensor], bases: Sequence[int], seed: int, offset: int) -> list[Tensor]:
    """The stream's float32 normals for tensors of these shapes, from the compiled kernel."""
    out = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
    torch.ops.bsam_fast.normal_(out, list(bases), to_signed64(seed), to_signed64(offset))
    return out

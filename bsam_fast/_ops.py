"""Thin Python wrappers of the ``bsam_fast`` ops (schemas: ``csrc/ops.cpp``).

Loading ``bsam_fast._C`` registers the ops and their CPU (and CUDA) kernels. The fake
implementations below let ``torch.compile`` and ``torch.library.opcheck`` trace them:
every op mutates its arguments in place and returns nothing. The kernels are not used
(the pure-PyTorch backends run instead, with one warning saying why) when they were not
built, do not load, were built for another torch, or ``BSAM_PURE_PYTORCH=1`` is set.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._checks import warn_user

REBUILD = "pip install --no-build-isolation ."     # builds against the torch you have
PURE_PYTORCH_VARIABLE = "BSAM_PURE_PYTORCH"


def _load() -> tuple[Optional[str], bool]:
    """(why the kernels are unavailable, or None; whether to warn about it)."""
    value = os.environ.get(PURE_PYTORCH_VARIABLE, "")
    if value not in ("", "0"):
        return f"{PURE_PYTORCH_VARIABLE}={value} asks for the pure-PyTorch backends", False
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return f"this install has no compiled kernels (bsam_fast/_C*.so was not built); build them: {REBUILD}", True
    try:
        from . import _C  # registers torch.ops.bsam_fast.*
    except ImportError as exc:                       # most often: built for another torch
        return f"the compiled kernels do not load ({str(exc).splitlines()[0]}); rebuild: {REBUILD}", True
    built = getattr(_C, "torch_version", "unknown")
    if built not in ("unknown", torch.__version__):
        return (f"the compiled kernels were built for torch {built}, but torch {torch.__version__} is "
                f"loaded; rebuild them for it: {REBUILD}"), True
    return None, False


LOAD_ERROR, _warn = _load()
_warned = not _warn


def is_loaded() -> bool:
    return LOAD_ERROR is None


def warn_once_unavailable() -> None:
    """Say once (at the user's line) that the compiled kernels are not used and what runs
    instead; not when BSAM_PURE_PYTORCH asked for that."""
    global _warned
    if not _warned and LOAD_ERROR is not None:
        _warned = True
        warn_user(f"bsam_fast: compiled kernels not available: {LOAD_ERROR}. Using the pure-PyTorch "
                  "'foreach' backend (slower).")


def cpu_kernels() -> Optional[str]:
    """The instruction set whose CPU kernels run in this process ("AVX512", "AVX2",
    "DEFAULT", or "march=..." for a build with BSAM_CPU_ARCH), or None without kernels.
    It follows ATen's choice, which the ATEN_CPU_CAPABILITY environment variable can set,
    as far as the processor has the instructions."""
    if not is_loaded():
        return None
    from . import _C
    return getattr(_C, "cpu_kernels", None)


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
            noise: Optional[Sequence[Tensor]] = None, offset_tensor: Optional[Tensor] = None,
            table_key: Optional[int] = None) -> None:
    """table_key: see csrc/ops.cpp (a step plan's bucket: the same lists at every call)."""
    torch.ops.bsam_fast.sample_(params, means, precisions, list(bases), float(num_data),
                                to_signed64(seed), to_signed64(offset), load_mean,
                                None if noise is None else list(noise), offset_tensor, table_key)


def _scalar_tensor(value, device: torch.device) -> Optional[Tensor]:
    """A tensor-valued lr, rho or factor as the kernels read it: float32 or float64 in place
    (no copy per call, so that writes to it drive a captured graph), else as float64."""
    if not isinstance(value, Tensor):
        return None
    return value.to(device=device, dtype=value.dtype if value.dtype in (torch.float32, torch.float64)
                    else torch.float64)


def perturb_(params, grads, means, precisions, u_sums, rho, inv_scale, first_part,
             found_inf, table_key: Optional[int] = None) -> None:
    """rho may be a Python number or a one-element tensor on the device."""
    rho_tensor = _scalar_tensor(rho, params[0].device)
    torch.ops.bsam_fast.perturb_(params, grads, means, precisions, u_sums,
                                 0.0 if rho_tensor is not None else float(rho),
                                 inv_scale, first_part, found_inf, rho_tensor, table_key)


def check_finite_(tensors, found_inf, like: Optional[Sequence[Tensor]] = None) -> None:
    """like: the parameters the tensors (gradients) must match in dtype, shape and device."""
    torch.ops.bsam_fast.check_finite_(tensors, found_inf, None if like is None else list(like))


def update_(params, means, momenta, precisions, grads, u_sums, grad_factor, u_factor, lr,
            beta1, beta2, weight_decay, damping, write_mean, skip_if: Optional[Tensor] = None,
            table_key: Optional[int] = None) -> None:
    """grad_factor and lr may be Python numbers or one-element tensors on the device; both
    kernels read tensors as float64 (lr and rho too), the precision of the arithmetic for
    float64 parameters."""
    factor_tensor = _scalar_tensor(grad_factor, params[0].device)
    factor = 1.0 if factor_tensor is not None else float(grad_factor)
    lr_tensor = _scalar_tensor(lr, params[0].device)
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    torch.ops.bsam_fast.update_(params, means, momenta, precisions, grads, u_sums,
                                factor_tensor, factor, float(u_factor), lr_value, float(beta1),
                                float(beta2), float(weight_decay), float(damping), write_mean,
                                lr_tensor, skip_if, table_key)


def normal(tensors: Sequence[Tensor], bases: Sequence[int], seed: int, offset: int) -> list[Tensor]:
    """The stream's float32 normals for tensors of these shapes, from the compiled kernel."""
    out = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
    torch.ops.bsam_fast.normal_(out, list(bases), to_signed64(seed), to_signed64(offset))
    return out

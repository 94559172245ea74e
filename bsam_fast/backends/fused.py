"""Compiled backends from the ``bsam_fast._C`` extension: ``cpu`` (and ``cuda``).

Each phase is one op call over a whole bucket, i.e. one pass over all its parameters.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import _ops
from .base import Backend, Bucket, Scalar


class FusedBackend(Backend):
    device_type = "?"
    device_side = True
    checks_inputs = True

    @classmethod
    def is_available(cls) -> bool:
        if cls.device_type == "cuda" and not torch.cuda.is_available():
            return False
        return _ops.has_kernel(cls.device_type)

    @classmethod
    def unavailable_reason(cls) -> str:
        if not _ops.is_loaded():
            return f"the extension bsam_fast._C did not load: {_ops.LOAD_ERROR}"
        if not _ops.has_kernel(cls.device_type):
            return f"the extension was built without {cls.device_type} kernels"
        return "no CUDA device is available"

    def supports(self, param: Tensor) -> Optional[str]:
        if param.device.type != self.device_type:
            return f"a parameter is on {param.device}, this backend runs on {self.device_type}"
        if not param.is_contiguous():
            return "a parameter is not contiguous"
        if param.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"dtype {param.dtype} is not supported"
        return None

    def sample(self, b: Bucket, num_data: float, seed: int, offset: int,
               noise: Optional[Sequence[Tensor]], load_mean: bool,
               offset_tensor: Optional[Tensor] = None) -> None:
        bases, key = b.bases, b.table_key
        if noise is None and not b.aligned:
            noise = _normals_from(bases, b.params, seed, offset)
        if noise is not None:
            noise = [x.to(b.means[0].dtype).contiguous() for x in noise]
            bases, key = [base - base % 4 for base in bases], None    # unread: the noise is given
        _ops.sample_(b.params, b.means, b.precisions, bases, num_data, seed, offset,
                     load_mean, noise, offset_tensor, key)

    def perturb(self, b: Bucket, grads: list[Tensor], rho: float,
                inv_scale: Optional[Tensor], first_part: bool, found_inf: Tensor) -> None:
        _ops.perturb_(b.params, grads, b.means, b.precisions, b.u_sums, rho, inv_scale,
                      first_part, found_inf, b.table_key)

    def check_finite(self, grads: list[Tensor], found_inf: Tensor, like: Optional[list[Tensor]] = None) -> None:
        _ops.check_finite_(grads, found_inf, like)

    def prepare_update(self, b: Bucket, grads: list[Tensor], grad_factor: Scalar, u_factor: float,
                       lr: Scalar, beta1: float, beta2: float, weight_decay: float,
                       damping: float, skip_if: Optional[Tensor] = None) -> Callable[[], None]:
        return lambda: _ops.update_(b.params, b.means, b.momenta, b.precisions, grads, b.u_sums,
                                    grad_factor, u_factor, lr, beta1, beta2, weight_decay, damping,
                                    b.master_mean, skip_if, b.table_key)


def _normals_from(bases: list[int], like: list[Tensor], seed: int, offset: int) -> list[Tensor]:
    """The stream's normals at indices base + j for tensors shaped like `like`, for bases
    that need not be multiples of 4 (FSDP2 shards that start mid-row-block): the kernels
    draw whole Philox blocks, so draw from the block before and drop the lanes ahead."""
    lanes = [base % 4 for base in bases]
    padded = _ops.normal([torch.empty(lane + t.numel(), device=t.device) for lane, t in zip(lanes, like)],
                         [base - lane for base, lane in zip(bases, lanes)], seed, offset)
    return [x[lane:].view(t.shape) for x, lane, t in zip(padded, lanes, like)]


class CpuBackend(FusedBackend):
    name = "cpu"
    device_type = "cpu"
    priority = 20


class CudaBackend(FusedBackend):
    name = "cuda"
    device_type = "cuda"
    priority = 30


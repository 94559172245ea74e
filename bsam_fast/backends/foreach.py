"""The ``foreach`` backend: the reference's arithmetic as multi-tensor ``torch._foreach_*`` ops.

Each phase is a handful of foreach calls over a whole bucket (one device, one dtype), so
the number of kernel launches does not grow with the number of tensors.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .base import Backend, Bucket, Scalar, mark_non_finite
from ..noise import normal_like


def _as_opmath(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    if tensors and tensors[0].dtype != like[0].dtype:
        return [t.to(like[0].dtype) for t in tensors]
    return tensors


class ForeachBackend(Backend):
    name = "foreach"
    priority = 10

    def sample(self, b: Bucket, num_data: float, seed: int, offset: int,
               noise: Optional[Sequence[Tensor]], load_mean: bool,
               offset_tensor: Optional[Tensor] = None) -> None:
        if load_mean:
            torch._foreach_copy_(b.means, b.params)
        dtype = b.means[0].dtype
        if noise is None:
            xi = normal_like(b.params, b.bases, seed, offset, dtype=dtype)
        else:
            xi = [x.to(dtype, copy=True) for x in noise]   # never modify the caller's draws
        std = torch._foreach_mul(b.precisions, float(num_data))
        torch._foreach_sqrt_(std)
        torch._foreach_div_(xi, std)                      # xi / sqrt(N s)
        torch._foreach_add_(xi, b.means)                  # w + xi / sqrt(N s)
        torch._foreach_copy_(b.params, xi)

    def perturb(self, b: Bucket, grads: list[Tensor], rho: float,
                inv_scale: Optional[Tensor], first_part: bool, found_inf: Tensor) -> None:
        g = _as_opmath(grads, b.means)
        mark_non_finite(g, found_inf)
        if inv_scale is not None:
            g = torch._foreach_mul(g, inv_scale)
        sqrt_s = torch._foreach_sqrt(b.precisions)
        magnitude = torch._foreach_abs(g)
        torch._foreach_mul_(magnitude, sqrt_s)            # sqrt(s) * |g|
        if first_part:
            torch._foreach_copy_(b.u_sums, magnitude)
        else:
            torch._foreach_add_(b.u_sums, magnitude)
        e = torch._foreach_mul(g, rho)
        torch._foreach_div_(e, b.precisions)              # rho * g / s
        torch._foreach_add_(e, b.means)
        torch._foreach_copy_(b.params, e)

    def prepare_update(self, b: Bucket, grads: list[Tensor], grad_factor: Scalar, u_factor: float,
                       lr: Scalar, beta1: float, beta2: float, weight_decay: float,
                       damping: float, skip_if: Optional[Tensor] = None) -> Callable[[], None]:
        g = _as_opmath(grads, b.means)
        g = torch._foreach_mul(g, grad_factor)
        torch._foreach_add_(g, torch._foreach_mul(b.means, weight_decay))   # g + delta w
        gm = torch._foreach_mul(b.momenta, beta1)
        torch._foreach_add_(gm, g, alpha=1 - beta1)
        step = torch._foreach_div(gm, b.precisions)                          # gm / s
        torch._foreach_mul_(step, lr)
        w = torch._foreach_sub(b.means, step)
        u = torch._foreach_mul(b.u_sums, u_factor)
        torch._foreach_add_(u, damping + weight_decay)   # u + (gamma + delta)
        s = torch._foreach_mul(b.precisions, beta2)
        torch._foreach_add_(s, u, alpha=1 - beta2)

        def commit() -> None:
            torch._foreach_copy_(b.momenta, gm)
            torch._foreach_copy_(b.means, w)
            torch._foreach_copy_(b.precisions, s)
            torch._foreach_copy_(b.params, b.means)
        return commit

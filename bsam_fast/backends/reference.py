"""The pure-PyTorch reference of bSAM: the oracle every faster backend is tested against.

Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes" (ICLR 2023), Algorithm 1,
in the exact form of the authors' code (see ``shared/golden/README.md``). bSAM keeps a
diagonal Gaussian posterior N(w, 1/(N*s)) over the weights; one step with m parts is::

    for k in 1..m:                                  # sub-batch B_k
        theta_k = w + xi_k / sqrt(N * s)            # xi_k ~ N(0, I): a posterior sample
        g_k     = grad of loss(B_k) at theta_k
        e_k     = rho * g_k / s                     # SAM perturbation, no normalisation
        h_k     = grad of loss(B_k) at w + e_k
    g  = mean_k h_k
    u  = mean_k sqrt(s) * |g_k|                     # gradient magnitude at the noisy point
    gm = beta1 * gm + (1 - beta1) * (g + delta * w) # delta = prior precision / N
    w  = w - lr * gm / s                            # uses s from before this step
    s  = beta2 * s + (1 - beta2) * (u + gamma + delta)

Each function below is one of those lines, on one tensor; `ReferenceBackend` calls them in
a plain loop over parameters. Arithmetic is in the state's dtype (fp32 for bf16/fp16
parameters, whose fp32 mean is the master copy).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .base import Backend, Bucket, Scalar, mark_non_finite
from ..noise import normal_like


def noisy_point(w: Tensor, s: Tensor, xi: Tensor, num_data: float) -> Tensor:
    """theta = w + xi / sqrt(N * s): a sample of the posterior N(w, 1/(N*s))."""
    return w + xi / torch.sqrt(num_data * s)


def gradient_magnitude(s: Tensor, g: Tensor) -> Tensor:
    """sqrt(s) * |g|: one part's contribution to u (g taken at the noisy point)."""
    return torch.sqrt(s) * g.abs()


def perturbed_point(w: Tensor, s: Tensor, g: Tensor, rho: float) -> Tensor:
    """w + e with e = rho * g / s: the SAM ascent step, preconditioned by s, not normalised."""
    return w + rho * g / s


def momentum_update(gm: Tensor, g: Tensor, w: Tensor, beta1: float, delta: float) -> Tensor:
    """gm = beta1 * gm + (1 - beta1) * (g + delta * w)."""
    return beta1 * gm + (1 - beta1) * (g + delta * w)


def mean_update(w: Tensor, gm: Tensor, s: Tensor, lr: Scalar) -> Tensor:
    """w = w - lr * gm / s, with s from before this step."""
    return w - lr * gm / s


def precision_update(s: Tensor, u: Tensor, beta2: float, gamma: float, delta: float) -> Tensor:
    """s = beta2 * s + (1 - beta2) * (u + gamma + delta)."""
    return beta2 * s + (1 - beta2) * (u + gamma + delta)


class ReferenceBackend(Backend):
    """A plain per-parameter loop over the functions above."""

    name = "reference"

    def sample(self, b: Bucket, num_data: float, seed: int, offset: int,
               noise: Optional[Sequence[Tensor]], load_mean: bool,
               offset_tensor: Optional[Tensor] = None) -> None:
        for i, (p, w, s) in enumerate(zip(b.params, b.means, b.precisions)):
            if load_mean:
                w.copy_(p)
            if noise is None:
                xi = normal_like([p], [b.bases[i]], seed, offset, dtype=w.dtype)[0]
            else:
                xi = noise[i].to(w.dtype)
            p.copy_(noisy_point(w, s, xi, num_data))

    def perturb(self, b: Bucket, grads: list[Tensor], rho: float,
                inv_scale: Optional[Tensor], first_part: bool, found_inf: Tensor) -> None:
        mark_non_finite(grads, found_inf)
        for p, w, s, u, grad in zip(b.params, b.means, b.precisions, b.u_sums, grads):
            g = grad.to(w.dtype)
            if inv_scale is not None:
                g = g * inv_scale
            magnitude = gradient_magnitude(s, g)
            u.copy_(magnitude if first_part else u + magnitude)
            p.copy_(perturbed_point(w, s, g, rho))

    def prepare_update(self, b: Bucket, grads: list[Tensor], grad_factor: Scalar, u_factor: float,
                       lr: Scalar, beta1: float, beta2: float, weight_decay: float,
                       damping: float, skip_if: Optional[Tensor] = None) -> Callable[[], None]:
        new = []
        for w, gm, s, usum, grad in zip(b.means, b.momenta, b.precisions, b.u_sums, grads):
            g = grad.to(w.dtype) * grad_factor
            u = usum * u_factor
            gm_new = momentum_update(gm, g, w, beta1, weight_decay)
            new.append((gm_new, mean_update(w, gm_new, s, lr), precision_update(s, u, beta2, damping, weight_decay)))

        def commit() -> None:
            for p, w, gm, s, (gm_new, w_new, s_new) in zip(b.params, b.means, b.momenta, b.precisions, new):
                gm.copy_(gm_new)
                w.copy_(w_new)
                s.copy_(s_new)
                p.copy_(w)
        return commit

    def restore(self, b: Bucket) -> None:
        for p, w in zip(b.params, b.means):
            p.copy_(w)

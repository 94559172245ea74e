"""The peer a user would write instead of this package: bSAM's update in plain PyTorch
with ``torch.randn`` noise, compiled by ``torch.compile`` (Inductor fuses each phase into
generated kernels). The benchmark (``python -m bsam_fast.bench --backends compiled``)
times it next to our backends; it is not an optimizer backend (its noise is torch's, not
the counter-based stream, and it has no inf/NaN skip, GradScaler or checkpoint support).

Each phase is the reference's per-tensor formulas (``backends/reference.py``) applied to
lists of tensors: ``w`` holds the mean, ``p`` the point the model evaluates.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends.reference import (gradient_magnitude, mean_update, momentum_update, noisy_point,
                                 perturbed_point, precision_update)


def sample(params: Sequence[Tensor], means, precisions, num_data: float,
           noise: Optional[Sequence[Tensor]] = None) -> None:
    """p = w + xi / sqrt(N s), xi from torch.randn unless given."""
    for i, (p, w, s) in enumerate(zip(params, means, precisions)):
        xi = torch.randn_like(w) if noise is None else noise[i]
        p.copy_(noisy_point(w, s, xi, num_data))


def perturb(params, means, precisions, u_sums, grads, rho: float) -> None:
    """u = sqrt(s) |g|; p = w + rho g / s (one part)."""
    for p, w, s, u, g in zip(params, means, precisions, u_sums, grads):
        u.copy_(gradient_magnitude(s, g))
        p.copy_(perturbed_point(w, s, g, rho))


def update(params, means, momenta, precisions, u_sums, grads, lr: float, beta1: float,
           beta2: float, weight_decay: float, damping: float) -> None:
    """gm, w and s updated; p = w."""
    for p, w, gm, s, u, g in zip(params, means, momenta, precisions, u_sums, grads):
        gm_new = momentum_update(gm, g, w, beta1, weight_decay)
        w_new = mean_update(w, gm_new, s, lr)
        s.copy_(precision_update(s, u, beta2, damping, weight_decay))
        gm.copy_(gm_new)
        w.copy_(w_new)
        p.copy_(w_new)


def compiled_phases() -> tuple:
    """(sample, perturb, update), each compiled by torch.compile."""
    return tuple(torch.compile(fn) for fn in (sample, perturb, update))


__all__ = ["sample", "perturb", "update", "compiled_phases"]

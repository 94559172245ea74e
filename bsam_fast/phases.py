"""The functional core of a bSAM step: each phase over a step plan's buckets, with every
input passed in. ``BSAM`` (``optimizer.py``) owns the state and the step machine and
calls these; the arithmetic of a bucket is its backend's (``backends/``)::

    sample_noise()  ->  sample                      p = w + xi / sqrt(N s)
    perturb()       ->  perturb                     u (+)= sqrt(s)|g|,  p = w + rho g / s
    step()          ->  check_finite, then          inf/NaN flags of the perturbed gradients
                        prepare_update + commit     gm, w, s updated,  p = w
    cancel / skip   ->  restore                     p = w

``work`` is a list of (param group, its buckets), one entry per group.

Gradients: a backend that checks its inputs (the fused kernels: device, dtype, shape and
layout, before they touch memory) is handed the ``.grad`` of its buckets unchecked; only
if it refuses them does the Python check run (``_checks.check_gradients``), which
converts what it can (another floating dtype, not contiguous: every backend then gets
the same input) or raises an error that names the problem. Other backends get checked
gradients. In the update every bucket's gradients are accepted (by ``check_finite``)
before any bucket is written.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._checks import check_gradients
from .backends.base import Backend, Bucket

Work = list[tuple[dict, list[Bucket]]]
FlagOf = Callable[[torch.device], Tensor]


def inverse(scale: Tensor) -> Tensor:
    """1/scale of a GradScaler's scale, on its device, as float32 (computed in float64)."""
    return scale.double().reciprocal().float()


def scalar(value):
    """A one-element tensor hyperparameter (lr, rho) as a 0-dim view (the backends broadcast
    it over 0-dim and larger parameters alike); a float as it is."""
    return value.reshape(()) if isinstance(value, Tensor) else value


def grad_factor(inv_scale: Optional[Tensor], m: int, b: Bucket, clip: Optional[Tensor] = None):
    """1/m, times a GradScaler's 1/scale and a clipping coefficient (tensors: on the
    bucket's device in its opmath dtype, float64 for float64 parameters, as every backend
    reads the factor in the arithmetic's precision)."""
    if inv_scale is None and clip is None:
        return 1.0 / m
    factor = torch.full((), 1.0 / m, dtype=torch.float64, device=b.device) if inv_scale is None else \
        inv_scale.to(device=b.device, dtype=torch.float64).div(m)
    if clip is not None:
        factor = factor * clip.to(device=b.device, dtype=torch.float64)
    return factor.to(b.means[0].dtype)


def clip_coefficient(grads, m: int, inv_scale: Optional[Tensor], max_norm: float) -> Tensor:
    """min(1, max_norm / (|g| + 1e-6)) for g the mean perturbed gradient (unscaled) over
    every parameter: the factor ``clip_grad_norm_`` would multiply it by (a tensor: no
    host synchronisation)."""
    # In float32 at least: fp16 gradients still scaled by a GradScaler overflow in fp16.
    norms = [n for group_grads in grads for g in group_grads if g
             for n in torch._foreach_norm(g, 2, dtype=torch.promote_types(g[0].dtype, torch.float32))]
    home = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(home) for n in norms]))
    if m != 1 or inv_scale is not None:
        total = total * (1.0 / m if inv_scale is None else inv_scale.to(home).div(m))
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def bucket_gradients(work: Work, checked: bool) -> list[list[list[Tensor]]]:
    """Per group and bucket, the .grad of the bucket's parameters: checked, or as they are."""
    if checked:
        return [[check_gradients(b.owners) for b in buckets] for _, buckets in work]
    return [[[p.grad for p in b.owners] for b in buckets] for _, buckets in work]


def require_gradients(work: Work) -> None:
    """The perturbed gradient of every parameter that had a noisy one is there."""
    missing = len([p for _, buckets in work for b in buckets for p in b.owners if p.grad is None])
    if missing:
        raise RuntimeError(f"{missing} parameter(s) had a gradient at the noisy point but none at the "
                           "perturbed point")


def _accepted(backend: Backend, op: Callable[[list[Tensor]], None], b: Bucket,
              grads: list[Tensor]) -> list[Tensor]:
    """op(grads). A backend that checks its inputs may refuse unchecked gradients before it
    touches memory: they are then checked in Python (converted, or the problem named) and
    op runs again on converted ones; an error that is not about them is raised as it is.
    Returns the gradients op took."""
    try:
        op(grads)
        return grads
    except RuntimeError:
        if not backend.checks_inputs:             # it was given checked gradients
            raise
        checked = check_gradients(b.owners)       # raises, naming the problem, if there is one
        if all(c is g for c, g in zip(checked, grads)):
            raise                                 # not the gradients: the op's own error
    op(checked)
    return checked


def sample(backend: Backend, work: Work, key: int, offset: int, noise: Optional[dict], first_part: bool,
           offset_tensor: Optional[FlagOf]) -> None:
    """Phase 1: parameters := a posterior sample. noise: {id(parameter): xi}, or None for
    the stream's draw `offset`; offset_tensor(device): the device counter (capturable)."""
    done = []
    try:
        for group, buckets in work:
            for b in buckets:
                xi = None if noise is None else [noise[id(p)] for p in b.owners]
                backend.sample(b, group["num_data"], key, offset, xi, load_mean=first_part and not b.master_mean,
                               offset_tensor=None if offset_tensor is None else offset_tensor(b.device))
                done.append(b)
    except BaseException:
        if first_part:                 # their means are loaded: back to them (a later part's
            for b in done:             # step is cancelled as a whole by the optimizer)
                backend.restore(b)
        raise


def perturb(backend: Backend, work: Work, grads: list[list[list[Tensor]]], inv_scale: Optional[Tensor],
            first_part: bool, found_noisy: FlagOf, checked: bool = False) -> None:
    """Phase 2: u (+)= sqrt(s)|g|, parameters := w + rho g / s (g: the noisy gradients;
    checked: they are not the owners' .grad but tensors the caller made to fit, so an error
    is the backend's own)."""
    for (group, buckets), group_grads in zip(work, grads):
        rho = scalar(group["rho"])
        for b, g in zip(buckets, group_grads):
            scale = None if inv_scale is None else inv_scale.to(b.device)
            flag = found_noisy(b.device)
            if checked:
                backend.perturb(b, g, rho, scale, first_part, flag)
            else:
                _accepted(backend, lambda gs: backend.perturb(b, gs, rho, scale, first_part, flag), b, g)


def check_finite(backend: Backend, work: Work, grads: list[list[list[Tensor]]],
                 found_perturbed: FlagOf) -> list[list[list[Tensor]]]:
    """Flag inf/NaN in the perturbed gradients; returns them as every bucket accepted them."""
    return [[_accepted(backend, lambda gs: backend.check_finite(gs, found_perturbed(b.device), b.params), b, g)
             for b, g in zip(buckets, group_grads)]
            for (_, buckets), group_grads in zip(work, grads)]


def prepare_updates(backend: Backend, work: Work, grads: list[list[list[Tensor]]], m: int, u_factor: float,
                    inv_scale: Optional[Tensor], skip_flag: Optional[FlagOf],
                    clip: Optional[Tensor] = None) -> list[Callable[[], None]]:
    """Phase 3, computed: the commits that write momentum, mean, precision and parameters
    (skipped on the device where skip_flag(device) is non-zero; the perturbed gradient
    times `clip`, if given)."""
    commits = []
    for (group, buckets), group_grads in zip(work, grads):
        beta1, beta2 = group["betas"]
        for b, g in zip(buckets, group_grads):
            commits.append(backend.prepare_update(
                b, g, grad_factor(inv_scale, m, b, clip), u_factor, scalar(group["lr"]), beta1, beta2,
                group["weight_decay"], group["damping"], skip_if=None if skip_flag is None else skip_flag(b.device)))
    return commits


def restore(backend: Backend, work: Work) -> None:
    """Parameters := their mean (a cancelled or skipped step, parameters without a gradient)."""
    for _, buckets in work:
        for b in buckets:
            backend.restore(b)


def total_flag(flags: list[Tensor], home: torch.device) -> Optional[Tensor]:
    """The sum of inf/NaN flags (float32) on one device, or None if there are none."""
    total = None
    for flag in flags:
        flag = flag.to(device=home, dtype=torch.float32)
        total = flag if total is None else total + flag
    return total

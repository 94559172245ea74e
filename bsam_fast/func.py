"""``step_batched``: a bSAM step of m parts whose forward and backward passes run batched.

``BSAM.step_parts`` runs the m parts one after another: 2m forward/backward passes of
batch/m examples each. Here the m noisy points are made first (the noise stream's draws
for the next m ``sample_noise()`` calls, so the same noise as ``step_parts``), their
gradients come from one ``torch.func.vmap`` over a leading parts dimension of the
parameters and of the batch, then the m perturbed points and their gradients likewise;
the optimizer's own phases then make the step from those gradients (the same kernels and
the same update as ``step_parts``)::

    loss = step_batched(opt, model, F.cross_entropy, x, y, m=8)

Memory: m copies of the parameters and of their gradients, twice (noisy and perturbed).
Models ``vmap`` cannot batch (in-place buffer updates such as BatchNorm's running
statistics in training mode, data-dependent control flow) are refused with a message;
use ``step_parts`` for them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import _ops
from .noise import normal_like
from .optimizer import BSAM


def _check(opt: BSAM, model: nn.Module, inputs: Tensor, m: int) -> list[tuple[str, Tensor]]:
    """The model's trainable parameters, each the optimizer's, in the optimizer's order."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
    if opt.in_step:
        raise RuntimeError("step_batched() called inside a step begun with sample_noise()")
    if opt._group is not None or opt._shard_group is not None:
        raise ValueError("step_batched does not drive a distributed BSAM (vmap's gradients bypass DDP's and "
                         "FSDP2's reductions); use ddp_step or the phase API")
    if len(inputs) % m:
        raise ValueError(f"step_batched: a batch of {len(inputs)} does not split into m={m} equal parts "
                         "(vmap needs equal parts; use step_parts for uneven ones)")
    if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training and mod.track_running_stats
           for mod in model.modules()):
        raise ValueError("step_batched: the model has BatchNorm layers in training mode, whose running "
                         "statistics vmap cannot update per part; use step_parts for this model")
    owned = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    named = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}
    if sorted(named) != sorted(map(id, owned)):
        raise ValueError("step_batched: the model's trainable parameters must be exactly the optimizer's")
    for p in owned:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"step_batched takes float32/float64 parameters, got {p.dtype}; use step_parts")
        if not p.is_contiguous():
            raise ValueError("step_batched takes contiguous parameters; use step_parts")
    return [named[id(p)] for p in owned]


def _check_every_parameter_used(model, names, params, loss_fn, x, y) -> None:
    """A parameter the loss does not reach has no gradient: step_parts leaves it out of the
    step, while vmap would hand it zeros (and the step would move it). Refused, checked on
    one example's loss."""
    from torch.func import functional_call
    with torch.enable_grad():
        values = [p.detach().requires_grad_() for p in params]
        loss = loss_fn(functional_call(model, {**dict(model.named_buffers()), **dict(zip(names, values))},
                                       (x[:1],)), y[:1])
        grads = torch.autograd.grad(loss, values, allow_unused=True)
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise ValueError(f"step_batched: the loss does not reach {unused} (no gradient; step_parts leaves such "
                         "parameters out of the step): freeze them (requires_grad_(False)) or use step_parts")


def _stream_noise(opt: BSAM, params: list[Tensor], m: int) -> list[list[Tensor]]:
    """The noise the next m sample_noise() calls would draw from the optimizer's stream."""
    bases = [opt._noise_base[p] for p in params]
    key, offset = opt._noise_key, opt.noise_offset
    devices = {p.device for p in params}
    if len(devices) == 1 and _ops.has_kernel(params[0].device.type) and all(b % 4 == 0 for b in bases):
        return [_ops.normal(params, bases, key, offset + k) for k in range(m)]
    return [[normal_like([p], [b], key, offset + k, dtype=torch.float32)[0] for p, b in zip(params, bases)]
            for k in range(m)]


def step_batched(opt: BSAM, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                 targets: Tensor, m: int, noise: Optional[Sequence[Sequence[Tensor]]] = None) -> Tensor:
    """One bSAM step of m parts (``inputs``/``targets`` split into m equal parts along dim 0;
    ``loss_fn(model(part inputs), part targets)`` is a part's loss), the parts' passes
    batched with ``vmap``. ``noise``: one list of standard-normal draws per part, as
    ``step_parts`` takes it; default: the optimizer's stream. Returns the mean of the
    losses at the perturbed points; the parameters hold the new mean afterwards."""
    from torch.func import functional_call, grad_and_value, vmap
    named = _check(opt, model, inputs, m)
    names, params = [n for n, _ in named], [p for _, p in named]
    if noise is not None and len(noise) != m:
        raise ValueError(f"noise: expected one list per part (m={m}), got {len(noise)}")
    _check_every_parameter_used(model, names, params, loss_fn, inputs, targets)
    # noise: per part, one tensor per parameter of the optimizer (frozen ones included, as
    # sample_noise takes it); the trainable ones' are used here.
    every = [p for g in opt.param_groups for p in g["params"]]
    if noise is None:
        drawn = _stream_noise(opt, params, m)
        by_id = [dict(zip(map(id, params), part)) for part in drawn]
        noise = [[part[id(p)] if p.requires_grad else torch.zeros_like(p) for p in every]
                 for part in by_id]
    position = {id(p): i for i, p in enumerate(every)}
    noise = [list(part) for part in noise]
    xi = [[part[position[id(p)]] for p in params] for part in noise]
    buffers = dict(model.named_buffers())
    x_parts = inputs.reshape(m, len(inputs) // m, *inputs.shape[1:])
    y_parts = targets.reshape(m, len(targets) // m, *targets.shape[1:])

    def part_loss(values, x, y):
        return loss_fn(functional_call(model, {**buffers, **dict(zip(names, values))}, (x,)), y)
    grads_of = vmap(grad_and_value(part_loss))

    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    with torch.no_grad():
        s = [opt.state[p]["precision"] for p in params]
        n = [groups[id(p)]["num_data"] for p in params]
        rho = [groups[id(p)]["rho"] for p in params]
        # theta_k = w + xi_k / sqrt(N s) for all k at once (one pass over the m copies)
        noisy = [torch.addcmul(w, torch.stack([x[i] for x in xi]).to(w.dtype), torch.sqrt(n_i * s_i).reciprocal())
                 for i, (w, s_i, n_i) in enumerate(zip(params, s, n))]
    try:
        g_noisy, _ = grads_of(noisy, x_parts, y_parts)
        with torch.no_grad():      # w + rho g_k / s
            perturbed = [torch.addcmul(w, g, r / s_i) for w, g, s_i, r in zip(params, g_noisy, s, rho)]
        g_perturbed, losses = grads_of(perturbed, x_parts, y_parts)
        with torch.no_grad():      # the update reads only the sum of the perturbed gradients
            g_perturbed = [h.sum(0) for h in g_perturbed]
    except RuntimeError as exc:
        raise RuntimeError(f"step_batched: vmap could not batch this model's parts ({exc}); use "
                           "step_parts for it") from exc
    # The step itself, from these gradients: the optimizer's phases, part by part (each
    # part's noisy gradient sets its u and perturbation); .grad holds the sum of the
    # perturbed gradients from the first part on (banked and handed back by the phases).
    opt.zero_grad()
    try:
        for k in range(m):
            opt.sample_noise(noise=noise[k])
            for p, g in zip(params, g_noisy):
                p.grad = g[k]
            opt.perturb()
            if k == 0:
                for p, h in zip(params, g_perturbed):
                    p.grad = h
    except BaseException:
        opt.cancel_step()
        raise
    opt.step()
    return losses.detach().mean()


__all__ = ["step_batched"]

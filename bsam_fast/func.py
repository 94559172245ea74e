"""``step_batched``: a bSAM step of m parts whose forward and backward passes run batched.

``BSAM.step_parts`` runs the m parts one after another: 2m forward/backward passes of
batch/m examples each. Here the optimizer's phases run once for all parts, on stacks
(m, *shape) beside the parameters (which keep the mean): the m noisy points (the noise
stream's draws for the next m ``sample_noise()`` calls, so the same noise as
``step_parts``), their gradients from one ``torch.func.vmap`` over the parts dimension of
the stacks and of the batch, then the m perturbed points and their gradients likewise,
and the update from the sum of those. The backend's own kernels write each part's slice
of the stacks, so the arithmetic is ``step_parts``'::

    loss = step_batched(opt, model, F.cross_entropy, x, y, m=8)

Memory: m copies of the parameters (the noisy, then the perturbed points) and m of their
gradients.
Models ``vmap`` cannot batch (in-place buffer updates such as BatchNorm's running
statistics in training mode, data-dependent control flow) are refused with a message;
use ``step_parts`` for them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import phases
from ._checks import check_noise
from .optimizer import BSAM
from .step_state import NOISY, PERTURBED


def _check(opt: BSAM, model: nn.Module, inputs: Tensor, m: int) -> list[tuple[str, Tensor]]:
    """The model's trainable parameters, each the optimizer's, in the optimizer's order."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
    if opt.in_step:
        raise RuntimeError("step_batched() called inside a step begun with sample_noise()")
    if opt._capturable:
        raise ValueError("step_batched does not drive a capturable BSAM; use step_parts or the phase API")
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


def _loss_at(model: nn.Module, names: Sequence[str],
             loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Sequence[Tensor], Tensor, Tensor], Tensor]:
    """``loss_fn(model(x), y)`` as a function of the named parameters' values (in `names`'
    order; the model's buffers as they are), for autograd and torch.func alike."""
    from torch.func import functional_call
    buffers = dict(model.named_buffers())
    return lambda values, x, y: loss_fn(functional_call(model, {**buffers, **dict(zip(names, values))}, (x,)), y)


def _check_every_parameter_used(model, names, params, loss_fn, x, y) -> None:
    """A parameter the loss does not reach has no gradient: step_parts leaves it out of the
    step, while vmap would hand it zeros (and the step would move it). Refused, checked on
    one example's loss by autograd itself (a walk of the graph would miss an autograd.Function
    whose backward returns None for an input)."""
    with torch.enable_grad():
        values = [p.detach().requires_grad_() for p in params]
        loss = _loss_at(model, names, loss_fn)(values, x[:1], y[:1])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"step_batched: loss_fn must return a one-element tensor, got "
                            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
        grads = torch.autograd.grad(loss, values, allow_unused=True) if loss.requires_grad else [None] * len(values)
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise ValueError(f"step_batched: the loss does not reach {unused} (no gradient; step_parts leaves such "
                         "parameters out of the step): freeze them (requires_grad_(False)) or use step_parts")


def _part_work(work: list, stacks: dict[int, Tensor], k: int) -> list:
    """The step's buckets, writing into part k of the stacks instead of the parameters
    (which keep the mean). No table key: what a backend keeps for a bucket is for its own
    lists."""
    return [(group, [replace(b, params=[stacks[id(p)][k] for p in b.params], table_key=None) for b in buckets])
            for group, buckets in work]


@torch.no_grad()
def _sample_parts(opt: BSAM, m: int, noise: Optional[list[dict[int, Tensor]]]) -> dict[int, Tensor]:
    """Phase 1 for all m parts: the noisy points w + xi_k / sqrt(N s), k = 1..m, in stacks
    (m, *shape) beside the parameters, which keep the mean; xi_k the stream's draws for the
    next m parts (as m sample_noise() calls take them), or noise[k] ({id(parameter): xi},
    checked)."""
    st = opt._state
    opt._begin_step()
    try:
        for _, buckets in st.sampled:             # the step's mean (sample_noise's load_mean)
            for b in buckets:
                if not b.master_mean:
                    torch._foreach_copy_(b.means, b.params)
    except BaseException:
        st.begin()
        raise
    stacks = {id(p): torch.empty((m, *p.shape), dtype=p.dtype, device=p.device)
              for _, buckets in st.sampled for b in buckets for p in b.params}
    try:
        for k in range(m):
            phases.sample(opt._backend, _part_work(st.sampled, stacks, k), opt._noise_key, st.offset,
                          None if noise is None else noise[k], first_part=False, offset_tensor=None)
            st.advance_noise()
    except BaseException:
        opt.cancel_step()
        raise
    st.phase = NOISY
    return stacks


@torch.no_grad()
def _perturb_parts(opt: BSAM, m: int, noisy_grads: dict[int, Tensor], stacks: dict[int, Tensor]) -> None:
    """Phase 2 for all m parts: u = sum_k sqrt(s)|g_k| (summed in the order step_parts sums
    it) and the perturbed points w + rho g_k / s, written over the noisy points in `stacks`
    (the kernels do not read them), from the stacked noisy gradients (vmap's: the
    parameters' dtype, device and shape, contiguous). The step is then where step_parts'
    is before its last backward."""
    st = opt._state
    try:
        for k in range(m):
            grads = [[[noisy_grads[id(p)][k] for p in b.owners] for b in buckets] for _, buckets in st.sampled]
            phases.perturb(opt._backend, _part_work(st.sampled, stacks, k), grads, None, k == 0,
                           lambda device: st.found_flag("noisy", device), checked=True)
    except BaseException:
        opt.cancel_step()
        raise
    # Every trainable parameter has its gradients (checked before the step).
    st.active, st.active_work, st.idle_work = [gp.params for gp in st.plan.groups], st.sampled, []
    st.parts, st.phase = m, PERTURBED


def _parts_gradients(model: nn.Module, names: Sequence[str], loss_fn: Callable[[Tensor, Tensor], Tensor],
                     inputs: Tensor, targets: Tensor, m: int) -> Callable[[list[Tensor]], tuple[tuple, Tensor]]:
    """The m parts' gradients and losses in one vmap'd pass: a function of m stacked copies
    of the named parameters (one (m, *shape) tensor per name, in `names`' order), part k's
    loss ``loss_fn(model(part k of inputs), part k of targets)`` at copy k; the inputs and
    targets split into m equal parts along dim 0."""
    from torch.func import grad_and_value, vmap
    x_parts = inputs.reshape(m, len(inputs) // m, *inputs.shape[1:])
    y_parts = targets.reshape(m, len(targets) // m, *targets.shape[1:])
    grads_of = vmap(grad_and_value(_loss_at(model, names, loss_fn)))
    return lambda stacks: grads_of(stacks, x_parts, y_parts)


def step_batched(opt: BSAM, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                 targets: Tensor, m: int, noise: Optional[Sequence[Sequence[Tensor]]] = None) -> Tensor:
    """One bSAM step of m parts (``inputs``/``targets`` split into m equal parts along dim 0;
    ``loss_fn(model(part inputs), part targets)`` is a part's loss), the parts' passes
    batched with ``vmap``. ``noise``: one list of standard-normal draws per part, as
    ``step_parts`` takes it; default: the optimizer's stream. Returns the mean of the
    losses at the perturbed points; the parameters hold the new mean afterwards."""
    named = _check(opt, model, inputs, m)
    names, params = [n for n, _ in named], [p for _, p in named]
    if noise is not None:
        if len(noise) != m:
            raise ValueError(f"noise: expected one list per part (m={m}), got {len(noise)}")
        every = opt._params()
        noise = [dict(zip(map(id, every), check_noise(part, every))) for part in noise]
    _check_every_parameter_used(model, names, params, loss_fn, inputs, targets)
    grads_of = _parts_gradients(model, names, loss_fn, inputs, targets, m)

    def gradients_at(stacks: dict[int, Tensor]) -> tuple[list[Tensor], Tensor]:
        try:
            grads, losses = grads_of([stacks[id(p)] for p in params])
        except RuntimeError as exc:
            raise RuntimeError(f"step_batched: vmap could not batch this model's parts ({exc}); use "
                               "step_parts for it") from exc
        return [g.contiguous() for g in grads], losses

    opt.zero_grad()
    points = _sample_parts(opt, m, noise)
    try:
        g_noisy, _ = gradients_at(points)
        _perturb_parts(opt, m, {id(p): g for p, g in zip(params, g_noisy)}, points)
        del g_noisy                # at most m copies of the parameters and m of their gradients
        g_perturbed, losses = gradients_at(points)
        with torch.no_grad():      # the update reads only the sum of the perturbed gradients
            for p, h in zip(params, g_perturbed):
                p.grad = h.sum(0)
    except BaseException:
        opt.cancel_step()
        raise
    opt.step()
    return losses.detach().mean()


__all__ = ["step_batched"]

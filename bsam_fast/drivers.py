"""The step drivers of one process: ``BSAM.step(closure)`` and ``BSAM.step_parts``.

Each is a loop over the phase API (``sample_noise()``, backward, ``perturb()``, backward)
that ends with ``finish`` (the update: phase 3) or, on any error, ``cancel_step()``, so
that a failed closure leaves the parameters at the mean and the state as it was.
``ddp.ddp_step`` is the same loop for a DDP model. The optimizer validates the call
before it gets here; ``finish`` is passed in (not ``step()``) so that torch.optim's step
hooks run once per step, around the driver.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import gradients
from .step_state import PERTURBED, StepState


def closure_step(opt, closure: Callable[[], Tensor], noise: Optional[Sequence[Tensor]],
                 finish: Callable[[], None]):
    """One step of m = 1 part; returns the loss at the perturbed point (or, when the
    closure made no gradient at all, the first loss: no step, as torch.optim makes none)."""
    try:
        opt.sample_noise(noise)
        with torch.enable_grad():
            first = closure()
        if not gradients.any_gradient(opt.param_groups):
            # No backward at all (Lightning's training_step returning None skips a batch).
            opt.cancel_step()
            return first
        opt.perturb()
        with torch.enable_grad():
            loss = closure()
    except BaseException:
        opt.cancel_step()
        raise
    finish()
    return loss


def parts_step(opt, st: StepState, closure: Callable[[int], Tensor], m: int,
               noise: Optional[Sequence[Sequence[Tensor]]], finish: Callable[[], None]):
    """One step of m parts (``closure(k)``: part k's loss and backward); returns the mean
    of the losses at the perturbed points, or None if a closure returned no tensor."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
    if noise is not None and len(noise) != m:
        raise ValueError(f"noise: expected one list per part (m={m}), got {len(noise)}")
    if st.in_step:
        raise RuntimeError("step_parts() called inside a step begun with sample_noise()")
    losses = []
    try:
        for k in range(m):
            opt.sample_noise(None if noise is None else noise[k])
            with torch.enable_grad():
                closure(k)
            opt.perturb()
            # From part 2 on, .grad of the step's active parameters holds the earlier parts'
            # perturbed gradients: the closure's backward adds onto them.
            losses.append(gradients.run_onto_sum(st.active, lambda: closure(k)))
    except BaseException:
        opt.cancel_step()
        raise
    finish()
    if all(isinstance(loss, Tensor) for loss in losses):
        return torch.stack([loss.detach() for loss in losses]).mean()
    return None


def finishing_step(opt, st: StepState, closure, noise, finish: Callable[[], None]) -> None:
    """``step()`` after ``perturb()``: finishes a phase-API step, whose perturbed gradients
    are in already (a closure passed here is run, but may not change them)."""
    if st.phase != PERTURBED:
        raise RuntimeError("step() without a closure finishes a step begun with sample_noise() and "
                           "perturb(); pass a closure instead. Inside a trainer that calls "
                           "optimizer.step() itself (Hugging Face Trainer, accelerate, Lightning "
                           "16-mixed) see bsam_fast.integrations.")
    if noise is not None:
        raise ValueError("noise is given to sample_noise() in the phase API")
    if closure is not None:
        run_finishing_closure(opt, closure, st.active)
    finish()


def run_finishing_closure(opt, closure, active: list[list[Tensor]]) -> None:
    """A closure passed to the step() that finishes a phase-API step: a trainer's
    (Lightning's manual optimization wraps a do-nothing closure in its hooks, such as
    on_before_optimizer_step, which may read the gradients). It runs with the perturbed
    gradients in place; one that changes them would count the perturbed gradient twice:
    the step is then cancelled and refused."""
    before = gradients.left_by_step(active)
    try:
        with torch.enable_grad():
            closure()
        changed = gradients.left_by_step(active) != before
    except BaseException:
        opt.cancel_step()
        raise
    if changed:
        opt.cancel_step()
        raise RuntimeError("step(closure) after perturb(): the closure changed the gradients (a "
                           "backward?), which already hold the perturbed gradient; finish a "
                           "phase-API step with step() alone")

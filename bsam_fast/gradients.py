"""Where the gradients go during a bSAM step.

A step starts from no gradient (one left from before would be added to the noisy
gradient). ``perturb()`` consumes the noisy gradient and, from the second part on, hands
the running sum of the perturbed gradients back in ``.grad`` (so that autograd, and DDP's
all-reduce, accumulate onto it); the next part's ``sample_noise()`` banks that sum again.
``zero_grad()`` while ``.grad`` holds that sum is refused (it would drop the earlier
parts); ``step_parts`` sets the sum aside around each closure, so closures may zero.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def drop_stale(param_groups: list[dict], left: dict) -> int:
    """Drop the gradients present before a step; returns how many of them are not those
    the last step left (``left_by_step``): a backward since, onto them or anew."""
    stale = [p for g in param_groups for p in g["params"] if p.grad is not None]
    foreign = [p for p in stale if left.get(id(p)) != (id(p.grad), p.grad._version)]
    for p in stale:
        p.grad = None
    return len(foreign)


def refuse_zeroing(parts: int, active: list[list[Tensor]]) -> None:
    """zero_grad() after perturb() of part k > 1 is refused (before anything changes): it
    would drop the perturbed gradients of the earlier parts, which .grad holds."""
    if parts > 1 and any([p.grad is not None for params in active for p in params]):
        raise RuntimeError(f"zero_grad() after perturb() of part {parts} would drop the perturbed gradients of "
                           "the earlier parts, which .grad holds; zero the gradients before sample_noise() "
                           "instead (or use step_parts, whose closures may zero)")


def stale_warning(foreign: int) -> str:
    return (f"BSAM: {foreign} parameter(s) had a gradient from before the step that the last step did not "
            "leave (a backward without zero_grad(), or micro-batches accumulated for this step); it was "
            "dropped, as the noisy gradient must be taken at the noisy point alone. Gradients cannot be "
            "accumulated across bSAM steps: use m parts (step_parts; in Lightning, BSAMCallback refuses "
            "accumulate_grad_batches).")


def left_by_step(active: list[list[Tensor]]) -> dict:
    """{id(parameter): (id(gradient), its version)} of the gradients in .grad now."""
    return {id(p): (id(p.grad), p.grad._version) for params in active for p in params if p.grad is not None}


def left_in(param_groups: list[dict]) -> dict:
    """``left_by_step`` of every parameter of the groups."""
    return left_by_step([g["params"] for g in param_groups])


def any_gradient(param_groups: list[dict]) -> bool:
    return any([p.grad is not None for g in param_groups for p in g["params"]])


def take(active: list[list[Tensor]]) -> list[list[Optional[Tensor]]]:
    """The .grad of the step's active parameters (per group), leaving them None."""
    taken = [[p.grad for p in params] for params in active]
    for params in active:
        for p in params:
            p.grad = None
    return taken


def hand_back(active: list[list[Tensor]], sums: list[list[Optional[Tensor]]], first_part: bool) -> None:
    """After perturb(): .grad := nothing (part 1) or the sum of the earlier parts'
    perturbed gradients, onto which the next backward() accumulates."""
    for params, group_sums in zip(active, sums if not first_part else [None] * len(active)):
        for j, p in enumerate(params):
            p.grad = None if group_sums is None else group_sums[j]


def run_onto_sum(active: list[list[Tensor]], closure):
    """Run a part's closure at the perturbed point and add its gradient to the sum
    perturb() handed back, whatever the closure zeroes first (opt.zero_grad(),
    model.zero_grad(), a trainer's)."""
    held = take(active)
    with torch.enable_grad():
        loss = closure()
    with torch.no_grad():
        for params, sums in zip(active, held):
            for p, total in zip(params, sums):
                if total is not None:
                    p.grad = total if p.grad is None else total.add_(p.grad)
    return loss

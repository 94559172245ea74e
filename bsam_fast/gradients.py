"""Where the gradients go during a bSAM step. A mixin of ``BSAM`` (``optimizer.py``).

A step starts from no gradient (one left from before would be added to the noisy
gradient). ``perturb()`` consumes the noisy gradient and, from the second part on, hands
the running sum of the perturbed gradients back in ``.grad`` (so that autograd, and DDP's
all-reduce, accumulate onto it); the next part's ``sample_noise()`` banks that sum again.
``zero_grad()`` while ``.grad`` holds that sum is refused (it would drop the earlier
parts); ``step_parts`` sets the sum aside around each closure, so closures may zero.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._checks import check_gradients


class StepGradients:
    def _drop_stale_gradients(self, warn: bool = True) -> None:
        """Gradients left from before the step would be added to the noisy gradient: drop
        them (the noisy gradient must be taken at the noisy point alone), once with a word
        in the phase API (step(closure): the closure zeroes them anyway)."""
        stale = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not stale:
            return
        if warn and not getattr(self, "_warned_stale", False):
            self._warned_stale = True
            warnings.warn(f"BSAM: {len(stale)} parameter(s) had a gradient from before the step; "
                          "it was dropped, as the noisy gradient must be taken at the noisy point "
                          "alone. Call zero_grad() before sample_noise(); gradients cannot be "
                          "accumulated across bSAM steps (use m parts: step_parts).",
                          RuntimeWarning, stacklevel=4)
        for p in stale:
            p.grad = None

    def _closure_onto_sum(self, closure):
        """Run a part's closure at the perturbed point and add its gradient to the sum
        perturb() handed back, whatever the closure zeroes first (opt.zero_grad(),
        model.zero_grad(), a trainer's)."""
        held = self._take_active_gradients()
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            for params, sums in zip(self._state.active, held):
                for p, total in zip(params, sums):
                    if total is not None:
                        p.grad = total if p.grad is None else total.add_(p.grad)
        return loss

    def _bank_perturbed_gradients(self) -> None:
        """Part k > 1 begins: take the perturbed-gradient sum out of ``.grad``, so that the
        coming noisy backward() gives g_k alone; perturb() hands it back afterwards."""
        self._check_perturbed_gradients()
        self._state.banked = self._take_active_gradients()

    def _take_active_gradients(self) -> list[list[Tensor]]:
        """The .grad of the step's active parameters (per group), leaving them None."""
        taken = [[p.grad for p in params] for params in self._state.active]
        for params in self._state.active:
            for p in params:
                p.grad = None
        return taken

    def _check_perturbed_gradients(self) -> dict[int, Tensor]:
        """{id(p): gradient as the backends take it} of the active parameters; on a missing
        or unusable gradient the step is cancelled and the error raised."""
        grads = {}
        for params in self._state.active:
            missing = [p for p in params if p.grad is None]
            if missing:
                self.cancel_step()
                raise RuntimeError(f"{len(missing)} parameter(s) had a gradient at the noisy "
                                   "point but none at the perturbed point")
            try:
                grads.update((id(p), g) for p, g in zip(params, check_gradients(params)))
            except Exception:
                self.cancel_step()
                raise
        return grads

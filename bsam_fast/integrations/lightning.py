"""PyTorch Lightning with bSAM.

Automatic optimization works as with any closure optimizer: ``optimizer.step(closure)``
runs Lightning's closure (forward, backward) twice, at the noisy and at the perturbed
point. Add ``BSAMCallback()`` to the Trainer: it refuses the settings that cannot work
there, and says what does:

* ``precision="16-mixed"`` with a GradScaler: Lightning runs the closure once and then
  calls ``scaler.step(optimizer)`` without it; use ``"bf16-mixed"`` (no scaler), or manual
  optimization with ``bsam_manual_step`` (the scaler is handled there).
* ``accumulate_grad_batches > 1``: micro-batches backpropagated at different noisy points
  do not make a bSAM step; use a larger batch or m parts.
* ``gradient_clip_val``: Lightning clips after every closure call, so both the noisy and
  the perturbed gradient are clipped (a warning says so; clip in manual optimization to
  choose).

Manual optimization (``self.automatic_optimization = False``)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        return bsam_manual_step(self, lambda: F.cross_entropy(self(x), y))

``self.optimizers()`` (Lightning's wrapper) shares the optimizer's step state, so the
phase API works through it too.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

from torch import Tensor

from . import require, unwrap_bsam
pl = require("lightning.pytorch", "lightning")
from ..optimizer import BSAM


def _bsam_or_none(optimizer) -> Optional[BSAM]:
    try:
        return unwrap_bsam(optimizer)
    except TypeError:
        return None


def _scaler(trainer) -> Optional[object]:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def bsam_manual_step(module: "pl.LightningModule", loss_fn: Callable[[], Tensor], optimizer=None,
                     clip_val: Optional[float] = None) -> Tensor:
    """One bSAM step in manual optimization: loss_fn() computes the loss (forward pass) and
    is called at the noisy and at the perturbed point. clip_val: clip the perturbed
    gradient's norm. Returns the loss at the perturbed point, detached."""
    opt = optimizer if optimizer is not None else module.optimizers()
    scaler = _scaler(module.trainer)
    if scaler is not None and clip_val is not None:
        raise ValueError("bsam_manual_step: clip_val with a GradScaler (precision='16-mixed') is not "
                         "supported: Lightning unscales in optimizer.step(), after the clip would "
                         "have to happen; use precision='bf16-mixed' or '32' to clip")
    opt.sample_noise()
    try:
        module.manual_backward(loss_fn())
        opt.perturb(grad_scaler=scaler)
        loss = loss_fn()
        module.manual_backward(loss)
        if clip_val is not None:
            module.clip_gradients(opt, gradient_clip_val=clip_val, gradient_clip_algorithm="norm")
    except BaseException:
        opt.cancel_step()
        raise
    opt.step()
    opt.zero_grad()
    return loss.detach()


class BSAMCallback(pl.Callback):
    """Refuses, at the start of fit, the Trainer settings that cannot make a correct bSAM
    step with automatic optimization (see the module)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not any(_bsam_or_none(o) is not None for o in trainer.optimizers):
            raise ValueError("BSAMCallback: configure_optimizers() returned no BSAM optimizer")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"BSAM: accumulate_grad_batches={trainer.accumulate_grad_batches} is not "
                             "supported (micro-batches at different noisy points do not make one bSAM "
                             "step); use a larger batch or m parts")
        if not pl_module.automatic_optimization:
            return
        if _scaler(trainer) is not None:
            raise ValueError("BSAM with precision='16-mixed' (a GradScaler) needs manual optimization: "
                             "Lightning calls the closure once, then scaler.step() without it. Use "
                             "precision='bf16-mixed', or automatic_optimization = False with "
                             "bsam_fast.integrations.lightning.bsam_manual_step")
        if trainer.gradient_clip_val:
            warnings.warn("BSAM: Lightning clips after each closure call, so gradient_clip_val clips "
                          "both the noisy and the perturbed gradient", UserWarning, stacklevel=2)

"""Hugging Face ``transformers.Trainer`` with bSAM.

    from bsam_fast import BSAM
    from bsam_fast.integrations.huggingface import BSAMTrainer

    opt = BSAM(model.parameters(), lr=1e-3, num_data=len(train_set))
    trainer = BSAMTrainer(model=model, args=args, train_dataset=train_set, optimizers=(opt, None))
    trainer.train()

``Trainer`` (through accelerate) calls ``optimizer.step()`` without a closure, so the two
forward/backward passes of a bSAM step happen in ``training_step``: ``sample_noise()``,
the usual loss and backward at the noisy point, ``perturb()``, the loss and backward at
the perturbed point. ``optimizer.step()`` then finishes the step.

* fp16 (``args.fp16``): accelerate's GradScaler is handed to ``perturb()``, and
  ``scaler.step(optimizer)`` unscales the perturbed gradient (once, also after clipping's
  ``unscale_``); an overflow skips the step.
* ``max_grad_norm`` clips the perturbed gradient only (the noisy gradient enters through
  ``sqrt(s)*|g|`` and the perturbation ``rho*g/s``, unclipped).
* ``gradient_accumulation_steps > 1`` is refused: micro-batches backpropagated at
  different noisy points do not make a bSAM step. Use a larger batch, or m parts
  (``BSAM.step_parts``) in a loop of your own.
"""
from __future__ import annotations

from . import require, unwrap_bsam
transformers = require("transformers", "huggingface")


class BSAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training step is a bSAM step (see the module)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("BSAMTrainer: gradient_accumulation_steps must be 1 (got "
                             f"{self.args.gradient_accumulation_steps}); micro-batches at different "
                             "noisy points do not make one bSAM step. Use a larger batch instead.")
        if self.optimizer is None:
            raise ValueError("BSAMTrainer needs its BSAM optimizer: "
                             "BSAMTrainer(..., optimizers=(BSAM(model.parameters(), ...), None))")
        unwrap_bsam(self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = unwrap_bsam(self.optimizer)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        opt.sample_noise()
        try:
            super().training_step(model, inputs, num_items_in_batch)   # backward at the noisy point
            opt.perturb(grad_scaler=scaler)
            return super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            opt.cancel_step()
            raise

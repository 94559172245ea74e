"""``ddp_step``: one bSAM step of a ``DistributedDataParallel`` model with m local parts.

The paper distributes bSAM like m-sharpness: every rank samples its own noise and makes
its own perturbation; only the perturbed gradients (by DDP) and u (by the optimizer) are
averaged, so a step with W ranks and m local parts equals one process's step with m*W
parts. ::

    model = DDP(net)
    opt = BSAM(model.parameters(), lr=..., num_data=N, process_group=True)
    for x, y in loader:                       # this rank's shard of the batch
        parts = split_batch(x, y, m=m)
        loss = ddp_step(model, opt, lambda k: F.cross_entropy(model(parts[k][0]), parts[k][1]), m)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from .optimizer import BSAM


def ddp_step(model, optimizer: BSAM, loss_fn: Callable[[int], Tensor], m: int = 1,
             grad_scaler: Optional["torch.amp.GradScaler"] = None) -> Tensor:
    """One bSAM step of a DDP model with m local parts; loss_fn(k) is part k's loss.

    The noisy backward passes and all but the last perturbed one run under
    ``model.no_sync()``; the last perturbed backward all-reduces the sum of this rank's
    perturbed gradients (perturb() hands the running sum back in ``.grad``). Returns the
    mean loss at this rank's perturbed points.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
    if optimizer.in_step:
        raise RuntimeError("ddp_step() called inside a step begun with sample_noise()")
    scale = grad_scaler.scale if grad_scaler is not None else (lambda loss: loss)
    losses = []
    try:
        for k in range(m):
            optimizer.sample_noise()
            with model.no_sync():
                scale(loss_fn(k)).backward()
            optimizer.perturb(grad_scaler=grad_scaler)
            with (contextlib.nullcontext() if k == m - 1 else model.no_sync()):
                loss = loss_fn(k)
                scale(loss).backward()
            losses.append(loss.detach())
    except BaseException:
        optimizer.cancel_step()
        raise
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad()
    return torch.stack(losses).mean()

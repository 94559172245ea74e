"""bSAM inside the trainers people use. Each module imports its library only when used.

* ``bsam_fast.integrations.huggingface``: ``BSAMTrainer``, a ``transformers.Trainer``
  whose training step runs both bSAM passes (accelerate's ``optimizer.step()`` then
  finishes the step; fp16 through accelerate's GradScaler).
* ``bsam_fast.integrations.lightning``: ``bsam_manual_step`` for manual optimization
  (any precision, 16-mixed's GradScaler included) and ``BSAMCallback``, which refuses the
  settings that cannot work with automatic optimization and says what does.

A loop of your own (timm-style, accelerate without Trainer) needs neither: use
``opt.step(closure)`` or the phase API (README, "Integrations").
"""
from __future__ import annotations

import importlib

from ..optimizer import BSAM


def require(module: str, extra: str):
    """Import `module`, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed: this integration needs it. "
                          f"pip install 'bsam-fast[{extra}]' (or pip install {extra})") from exc


def unwrap_bsam(optimizer) -> BSAM:
    """The BSAM inside a trainer's optimizer wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer, ...), or a TypeError naming what was found."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, BSAM):
            return seen
        inner = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if inner is None:
            break
        seen = inner
    raise TypeError(f"expected a BSAM optimizer (possibly wrapped), got {type(optimizer).__name__}")

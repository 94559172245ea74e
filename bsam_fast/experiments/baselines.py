"""SAM (Foret et al., 2021) around any torch optimizer: SAM-SGD and SAM-Adam baselines.

One step with m parts: for each part k, the gradient g_k at w, the ascent point
w + rho * g_k / ||g_k|| (||.|| over all parameters), the gradient there; the base optimizer
then steps with the mean of the m perturbed gradients. m = 1 is plain SAM.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation wrapping ``base_optimizer(params, **kwargs)``."""

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
                 rho: float = 0.05, **kwargs):
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho: {rho} (must be >= 0)")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups    # one set of groups for schedulers

    @torch.no_grad()
    def _ascend(self) -> list[tuple[Tensor, Tensor]]:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0
        moved = []
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale
                p.add_(e)
                moved.append((p, e))
        return moved

    @torch.no_grad()
    def _descend(self, moved) -> None:
        for p, e in moved:
            p.sub_(e)

    def step(self, closure: Callable[[], Tensor]):
        return self.step_parts(lambda k: closure(), 1)

    def step_parts(self, closure: Callable[[int], Tensor], m: int):
        """closure(k): zero the gradients, compute part k's loss, backward(), return it."""
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
        params = [p for g in self.param_groups for p in g["params"]]
        total = [torch.zeros_like(p) for p in params]
        losses = []
        for k in range(m):
            with torch.enable_grad():
                closure(k)
            moved = self._ascend()
            try:
                with torch.enable_grad():
                    loss = closure(k)
                if isinstance(loss, Tensor):
                    losses.append(loss.detach())
            finally:
                self._descend(moved)
            with torch.no_grad():
                for t, p in zip(total, params):
                    if p.grad is not None:
                        t.add_(p.grad, alpha=1.0 / m)
        for t, p in zip(total, params):
            p.grad = t
        self.base_optimizer.step()
        return torch.stack(losses).mean() if losses else None

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)

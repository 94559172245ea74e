"""The posterior N(w, 1/(N*s)) that ``BSAM`` learns: its standard deviation and samples
of it in the parameters. A mixin of ``BSAM`` (``optimizer.py``); predictions and Bayesian
model averaging are in ``predict.py``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from .backends.base import opmath_dtype


class PosteriorMethods:
    @torch.no_grad()
    def posterior_std(self) -> list[Tensor]:
        """Per-parameter posterior standard deviation 1/sqrt(N*s), in param-group order;
        0 for frozen parameters (requires_grad=False): they are not part of the posterior."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    out.append(torch.zeros_like(p, dtype=opmath_dtype(p.dtype)))
                    continue
                state = self.state.get(p, {})
                s = state.get("precision")
                if s is None:
                    s = torch.full_like(p, group["s_init"], dtype=opmath_dtype(p.dtype))
                out.append(torch.rsqrt(group["num_data"] * s))
        return out

    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        """Context manager: the parameters hold one posterior sample w + xi/sqrt(N*s)
        (xi from ``torch.randn`` with ``generator``), and the mean again on exit, also on
        an exception. Frozen parameters (requires_grad=False) keep their value."""
        if self.in_step:
            raise RuntimeError("sampled_params() inside an unfinished bSAM step")
        params = self._params()
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, std in zip(params, self.posterior_std()):
                    if not p.requires_grad:
                        continue
                    xi = torch.randn(p.shape, generator=generator, dtype=std.dtype,
                                     device=generator.device if generator is not None else p.device)
                    p.copy_(self._mean_of(p) + xi.to(p.device) * std)
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)

    def _mean_of(self, p: Tensor) -> Tensor:
        state = self.state.get(p, {})
        return state["mean"] if "mean" in state else p.detach().to(opmath_dtype(p.dtype))

"""The posterior N(w, 1/(N*s)) that ``BSAM`` learns: its standard deviation and samples
of it in the parameters. A mixin of ``BSAM`` (``optimizer.py``); predictions and Bayesian
model averaging are in ``predict.py``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import sharded
from .backends.base import opmath_dtype


class PosteriorMethods:
    @torch.no_grad()
    def posterior_std(self) -> list[Tensor]:
        """Per-parameter posterior standard deviation 1/sqrt(N*s), in param-group order;
        0 for frozen parameters (requires_grad=False): they are not part of the posterior.
        For an FSDP2 parameter, a DTensor laid out like it."""
        return [sharded.as_dtensor_like(std, p) if sharded.is_sharded(p) else std
                for p, std in zip(self._params(), self._local_posterior_std())]

    def _local_posterior_std(self) -> list[Tensor]:
        self._refresh_unstepped()                 # s_init may have changed since
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                shard = sharded.local(p)
                if not p.requires_grad:
                    out.append(torch.zeros_like(shard, dtype=opmath_dtype(p.dtype)))
                    continue
                s = self.state.get(p, {}).get("precision")
                if s is None:
                    s = torch.full_like(shard, group["s_init"], dtype=opmath_dtype(p.dtype))
                out.append(torch.rsqrt(group["num_data"] * s))
        return out

    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        """Context manager: the parameters hold one posterior sample w + xi/sqrt(N*s)
        (xi from ``torch.randn`` with ``generator``), and the mean again on exit, also on
        an exception. Frozen parameters (requires_grad=False) keep their value.

        FSDP2 parameters: every rank must draw the same sample, so a generator is required
        (seeded alike on every rank); xi is drawn for the full tensor (one at a time) and
        each rank keeps its rows."""
        if self.in_step:
            raise RuntimeError("sampled_params() inside an unfinished bSAM step")
        params = self._params()
        if generator is None and any(sharded.is_sharded(p) for p in params):
            raise ValueError("sampled_params() of FSDP2-sharded parameters needs a torch.Generator "
                             "seeded alike on every rank (every rank must draw the same sample)")
        shards = [sharded.local(p) for p in params]
        saved = [shard.detach().clone() for shard in shards]
        self._reshard_fsdp_modules()          # the next forward gathers the sample
        try:
            with torch.no_grad():
                for p, shard, std in zip(params, shards, self._local_posterior_std()):
                    if not p.requires_grad:
                        continue
                    xi = torch.randn(p.shape, generator=generator, dtype=std.dtype,
                                     device=generator.device if generator is not None else shard.device)
                    if sharded.is_sharded(p):
                        xi = sharded.rows_of(xi, p)
                    shard.copy_(self._mean_of(p) + xi.to(shard.device) * std)
            yield
        finally:
            with torch.no_grad():
                for shard, w in zip(shards, saved):
                    shard.copy_(w)
            self._reshard_fsdp_modules()      # ... and the one after, the mean

    def _mean_of(self, p: Tensor) -> Tensor:
        state = self.state.get(p, {})
        if "mean" in state and p not in self._unstepped:       # the fp32 master
            return state["mean"]
        return sharded.local(p).detach().to(opmath_dtype(p.dtype))

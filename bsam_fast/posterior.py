"""The posterior N(w, 1/(N*s)) that ``BSAM`` learns: its standard deviation and samples of
it in the parameters, as functions of the optimizer's groups and state (``BSAM``'s
``posterior_std`` and ``sampled_params`` call them). Predictions and Bayesian model
averaging are in ``predict.py``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from . import sharded
from .backends.base import opmath_dtype


def local_posterior_std(param_groups: list[dict], state) -> list[Tensor]:
    """1/sqrt(N*s) of every parameter's local shard, in group order; 0 for frozen ones
    (requires_grad=False: not part of the posterior); s_init where no state is made."""
    out = []
    for group in param_groups:
        for p in group["params"]:
            shard = sharded.local(p)
            if not p.requires_grad:
                out.append(torch.zeros_like(shard, dtype=opmath_dtype(p.dtype)))
                continue
            s = state.get(p, {}).get("precision")
            if s is None:
                s = torch.full_like(shard, group["s_init"], dtype=opmath_dtype(p.dtype))
            out.append(torch.rsqrt(group["num_data"] * s))
    return out


def mean_of(p: Tensor, state, unstepped: set) -> Tensor:
    """The posterior mean of p's local shard: the fp32 master of a bf16/fp16 parameter,
    else the parameter (which holds the mean between steps)."""
    st = state.get(p, {})
    if "mean" in st and p not in unstepped:
        return st["mean"]
    return sharded.local(p).detach().to(opmath_dtype(p.dtype))


@contextlib.contextmanager
def sampled(params: list[Tensor], stds: list[Tensor], means: list[Tensor], generator: Optional[torch.Generator],
            reshard: Callable[[], None]) -> Iterator[None]:
    """The parameters hold mean + xi * std (xi from torch.randn with `generator`; an FSDP2
    parameter's xi is drawn for the full tensor and cut to its rows), and their values
    again on exit, also on an exception; frozen parameters keep theirs. reshard() runs
    before both writes (FSDP2: the next forward gathers what was written)."""
    if generator is None and any(sharded.is_sharded(p) for p in params):
        raise ValueError("sampled_params() of FSDP2-sharded parameters needs a torch.Generator "
                         "seeded alike on every rank (every rank must draw the same sample)")
    shards = [sharded.local(p) for p in params]
    saved = [shard.detach().clone() for shard in shards]
    reshard()
    try:
        with torch.no_grad():
            for p, shard, std, mean in zip(params, shards, stds, means):
                if not p.requires_grad:
                    continue
                xi = torch.randn(p.shape, generator=generator, dtype=std.dtype,
                                 device=generator.device if generator is not None else shard.device)
                if sharded.is_sharded(p):
                    xi = sharded.rows_of(xi, p)
                shard.copy_(mean + xi.to(shard.device) * std)
        yield
    finally:
        with torch.no_grad():
            for shard, w in zip(shards, saved):
                shard.copy_(w)
        reshard()

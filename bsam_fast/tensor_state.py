"""The tensors ``BSAM`` keeps per parameter.

``state[p]``: ``momentum`` (gm) and ``precision`` (s) in the opmath dtype (fp32 for
bf16/fp16 parameters, else the parameter's), and for bf16/fp16 parameters the fp32 master
``mean``. Scratch buffers, kept between steps to avoid reallocation and never saved: the
mean ``w`` of fp32/fp64 parameters during a step (the parameter holds the noisy or
perturbed point meanwhile) and ``u``, the sum of sqrt(s)*|g_k| over the parts. For FSDP2
parameters (``sharded.py``) every tensor here is the local shard's.

State is made when a parameter joins the optimizer (so that a checkpoint loader such as
torch.distributed.checkpoint finds tensors to load into before the first step). Until the
parameter's first step (or the load of a stepped state) it is *unstepped*: made again
whenever it is read (the step's start, state_dict()), as the parameter may have been
loaded, moved or converted, or s_init changed, since the optimizer was made.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends.base import opmath_dtype
from .sharded import local


def init_state(state: dict, p: Tensor, s_init: float, unstepped: set) -> None:
    """Make (or, while p is unstepped, make again) the state of p in ``state`` (p's dict)."""
    shard = local(p)
    dtype = opmath_dtype(p.dtype)
    if "precision" in state and p in unstepped:
        s = state["precision"]
        if s.dtype == dtype and s.device == shard.device and s.shape == shard.shape:
            state["momentum"].zero_()             # in place: a loader may hold them
            s.fill_(s_init)
            if dtype != p.dtype:
                if "mean" not in state:
                    state["mean"] = torch.empty_like(s)
                state["mean"].copy_(shard)
            else:
                state.pop("mean", None)
            return
        state.clear()
    if "precision" not in state:
        state["momentum"] = torch.zeros_like(shard, dtype=dtype, memory_format=torch.preserve_format)
        state["precision"] = torch.full_like(shard, s_init, dtype=dtype, memory_format=torch.preserve_format)
        if dtype != p.dtype:
            state["mean"] = shard.detach().to(dtype, copy=True)
        unstepped.add(p)


def refresh_unstepped(param_groups: list[dict], state, unstepped: set) -> bool:
    """Make the state of every unstepped parameter again (see the module docstring); True
    if there was any (what the step plan was built from may have changed)."""
    if not unstepped:                  # the usual case after the first step
        return False
    for group in param_groups:
        for p in group["params"]:
            if p in unstepped:
                if p.requires_grad:
                    init_state(state[p], p, group["s_init"], unstepped)
                else:                     # frozen since it joined: no state
                    state.pop(p, None)
                    unstepped.discard(p)
    return True


def scratch_buffer(scratch: dict, p: Tensor, name: str) -> Tensor:
    """A scratch buffer of the state's dtype, kept between steps to avoid reallocation."""
    bufs = scratch.setdefault(p, {})
    buf = bufs.get(name)
    shard = local(p)
    dtype = opmath_dtype(p.dtype)
    if buf is None or buf.shape != shard.shape or buf.dtype != dtype or buf.device != shard.device:
        buf = bufs[name] = torch.empty_like(shard, dtype=dtype, memory_format=torch.preserve_format)
    return buf


def memory_footprint(state, scratch: dict) -> dict[str, int]:
    """Bytes of the state tensors and of the scratch buffers."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
    return {"state": size(t for st in state.values() for t in st.values()),
            "scratch": size(t for bufs in scratch.values() for t in bufs.values())}

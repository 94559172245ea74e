"""The tensors ``BSAM`` keeps per parameter, and the buckets the backends work on.

``state[p]``: ``momentum`` (gm) and ``precision`` (s) in the opmath dtype (fp32 for
bf16/fp16 parameters, else the parameter's), and for bf16/fp16 parameters the fp32 master
``mean``. Scratch buffers, kept between steps to avoid reallocation and never saved: the
mean ``w`` of fp32/fp64 parameters during a step (the parameter holds the noisy or
perturbed point meanwhile) and ``u``, the sum of sqrt(s)*|g_k| over the parts.

A ``Bucket`` gathers the parameters of one param group that share a device and a dtype,
with these tensors: one call of a backend's phase covers one bucket.

A mixin of ``BSAM`` (``optimizer.py``).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .backends.base import Bucket, opmath_dtype


class TensorState:
    def _init_state(self, group: dict, p: Tensor) -> dict:
        state = self.state[p]
        if "precision" not in state:
            dtype = opmath_dtype(p.dtype)
            state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["precision"] = torch.full_like(p, group["s_init"], dtype=dtype,
                                                 memory_format=torch.preserve_format)
            if dtype != p.dtype:
                state["mean"] = p.detach().to(dtype, copy=True)
        return state

    def _buffer(self, p: Tensor, name: str) -> Tensor:
        """A scratch buffer of the state's dtype, kept between steps to avoid reallocation."""
        bufs = self._scratch.setdefault(p, {})
        buf = bufs.get(name)
        dtype = opmath_dtype(p.dtype)
        if buf is None or buf.shape != p.shape or buf.dtype != dtype or buf.device != p.device:
            buf = bufs[name] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return buf

    def _buckets(self, group: dict, params: list[Tensor]) -> list[Bucket]:
        by_key: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            by_key[(p.device, p.dtype)].append(p)
        buckets = []
        for (_, dtype), ps in by_key.items():
            states = [self.state[p] for p in ps]
            master = opmath_dtype(dtype) != dtype
            buckets.append(Bucket(
                params=ps,
                means=[st["mean"] if master else self._buffer(p, "mean")
                       for p, st in zip(ps, states)],
                momenta=[st["momentum"] for st in states],
                precisions=[st["precision"] for st in states],
                u_sums=[self._buffer(p, "u") for p in ps],
                bases=[self._noise_base[p] for p in ps],
                master_mean=master))
        return buckets

"""The tensors ``BSAM`` keeps per parameter, and the buckets the backends work on.

``state[p]``: ``momentum`` (gm) and ``precision`` (s) in the opmath dtype (fp32 for
bf16/fp16 parameters, else the parameter's), and for bf16/fp16 parameters the fp32 master
``mean``. Scratch buffers, kept between steps to avoid reallocation and never saved: the
mean ``w`` of fp32/fp64 parameters during a step (the parameter holds the noisy or
perturbed point meanwhile) and ``u``, the sum of sqrt(s)*|g_k| over the parts.

A ``Bucket`` gathers the parameters of one param group that share a device and a dtype,
with these tensors: one call of a backend's phase covers one bucket. For FSDP2 parameters
(``sharded.py``) every tensor here is the local shard's.

A mixin of ``BSAM`` (``optimizer.py``).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .backends.base import Bucket, opmath_dtype
from .sharded import local


class TensorState:
    def _init_state(self, group: dict, p: Tensor) -> dict:
        """The state of p, made when p joins the optimizer (so that a checkpoint loader
        such as torch.distributed.checkpoint finds tensors to load into before the first
        step). Until p's first step (or the load of a stepped state) it is made again
        whenever it is read (the step's start, state_dict()): the parameter may have been
        loaded, moved or converted, or s_init changed, since the optimizer was made."""
        state = self.state[p]
        shard = local(p)
        dtype = opmath_dtype(p.dtype)
        if "precision" in state and p in self._unstepped:
            s = state["precision"]
            if s.dtype == dtype and s.device == shard.device and s.shape == shard.shape:
                state["momentum"].zero_()             # in place: a loader may hold them
                s.fill_(group["s_init"])
                if dtype != p.dtype:
                    if "mean" not in state:
                        state["mean"] = torch.empty_like(s)
                    state["mean"].copy_(shard)
                else:
                    state.pop("mean", None)
                return state
            state.clear()
        if "precision" not in state:
            state["momentum"] = torch.zeros_like(shard, dtype=dtype, memory_format=torch.preserve_format)
            state["precision"] = torch.full_like(shard, group["s_init"], dtype=dtype,
                                                 memory_format=torch.preserve_format)
            if dtype != p.dtype:
                state["mean"] = shard.detach().to(dtype, copy=True)
            self._unstepped.add(p)
        return state

    def _refresh_unstepped(self) -> None:
        """Re-read the state of every parameter not stepped yet (see _init_state)."""
        if not self._unstepped:                  # the usual case after the first step
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._unstepped:
                    if p.requires_grad:
                        self._init_state(group, p)
                    else:                     # frozen since it joined: no state
                        self.state.pop(p, None)
                        self._unstepped.discard(p)

    def memory_footprint(self) -> dict[str, int]:
        """Bytes of tensors this optimizer holds on this process: ``state`` (momentum,
        precision, fp32 master means: what a checkpoint saves) and ``scratch`` (the mean
        and u buffers of a step, kept between steps). Under FSDP2 these are this rank's
        shards; under DDP every rank holds them all."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
        return {"state": size(t for st in self.state.values() for t in st.values()),
                "scratch": size(t for bufs in self._scratch.values() for t in bufs.values())}

    def _buffer(self, p: Tensor, name: str) -> Tensor:
        """A scratch buffer of the state's dtype, kept between steps to avoid reallocation."""
        bufs = self._scratch.setdefault(p, {})
        buf = bufs.get(name)
        shard = local(p)
        dtype = opmath_dtype(p.dtype)
        if buf is None or buf.shape != shard.shape or buf.dtype != dtype or buf.device != shard.device:
            buf = bufs[name] = torch.empty_like(shard, dtype=dtype, memory_format=torch.preserve_format)
        return buf

    def _buckets(self, group: dict, params: list[Tensor]) -> list[Bucket]:
        """Buckets of the parameters (local shards of FSDP2 parameters), by device and dtype,
        and apart those whose noise does not start at a Philox block (a shard starting
        mid-block: the fused kernels cannot draw it, see ``FusedBackend.sample``)."""
        by_key: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            by_key[(p.device, p.dtype, self._noise_base[p] % 4 == 0)].append(p)
        buckets = []
        for (_, dtype, _), ps in by_key.items():
            states = [self.state[p] for p in ps]
            master = opmath_dtype(dtype) != dtype
            buckets.append(Bucket(
                params=[local(p) for p in ps],
                means=[st["mean"] if master else self._buffer(p, "mean")
                       for p, st in zip(ps, states)],
                momenta=[st["momentum"] for st in states],
                precisions=[st["precision"] for st in states],
                u_sums=[self._buffer(p, "u") for p in ps],
                bases=[self._noise_base[p] for p in ps],
                master_mean=master,
                keys=[id(p) for p in ps]))
        return buckets

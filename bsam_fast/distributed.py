"""The collectives of distributed bSAM: the seed broadcast, the all-reduce of u and the
inf/NaN flags, and the agreement before a load. Used by ``BSAM`` under DDP
(``process_group=``) and FSDP2; the user-level DDP driver is ``ddp.ddp_step``.

Under ``torch.nn.parallel.DistributedDataParallel`` (m-sharpness across ranks):

The paper distributes bSAM like m-sharpness: every rank samples its own noise (its own
stream, keyed by the shared seed and the rank) and makes its own perturbation; only the
perturbed gradients are averaged (by DDP's buckets, once per step), and so is u, the
mean of sqrt(s)*|g_k| (one flattened all-reduce inside ``BSAM.step``). With W ranks and m
local parts a step equals one process's step with m*W parts and the same noise streams,
and every rank ends the step with the same mean, momentum and precision.

"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor

from . import sharded


def setup(params: Sequence[Tensor], seed: int, process_group, capturable: bool) -> tuple:
    """BSAM's distributed setting: (DDP group, rank, world size, FSDP2 mesh group, seed).
    Under DDP every rank draws its own stream (the shared seed and the rank); under FSDP2
    every rank draws rank 0's stream and shares the inf/NaN flags over the mesh."""
    shard_group = sharded.mesh_group(params)
    if shard_group is not None:
        if process_group is not None:
            raise ValueError("process_group is for DistributedDataParallel (per-rank noise); "
                             "FSDP2-sharded parameters bring their own mesh: leave it out")
        if capturable:
            raise ValueError("capturable=True is not supported with FSDP2-sharded parameters")
        seed = broadcast_seed(shard_group, seed, sharded.local(params[0]).device)
    if process_group is None:
        return None, 0, 1, shard_group, seed
    group, rank, world_size, seed = join_process_group(process_group, seed, params)
    return group, rank, world_size, shard_group, seed


def rank_in(group) -> int:
    import torch.distributed as dist
    return dist.get_rank(group)


def join_process_group(process_group, seed: int, params: Sequence[Tensor]) -> tuple:
    """``BSAM(..., process_group=...)``: (group, rank, world size, shared seed). Every rank
    then draws from its own noise stream, keyed by the shared seed (rank 0's, broadcast
    here) and the rank (``noise.stream_seed``)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    group = dist.group.WORLD if process_group is True else process_group
    device = params[0].device if params else torch.device("cpu")
    return group, dist.get_rank(group), dist.get_world_size(group), broadcast_seed(group, seed, device)


def _collective_device(group, device: torch.device) -> torch.device:
    """Where a tensor must be for a collective of the group: NCCL reduces CUDA tensors only
    (state may be CPU-offloaded), gloo any."""
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def broadcast_seed(group, seed: int, device: torch.device) -> int:
    """Rank 0's 64-bit seed, on every rank of the group."""
    import torch.distributed as dist
    device = _collective_device(group, device)
    shared = torch.tensor([seed - (1 << 64) if seed >= (1 << 63) else seed], dtype=torch.int64,
                          device=device)
    dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
    value = int(shared.item())
    return value + (1 << 64) if value < 0 else value


def all_reduce_u_and_flags(group, u_sums: Sequence[Tensor], flags: Sequence[Tensor]) -> None:
    """Sum u over ranks and share the noisy-gradient inf/NaN flags (float32, one per
    device), in one flattened all-reduce per device and dtype; the perturbed gradients are
    DDP's to reduce."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in list(u_sums) + list(flags):
        groups[(t.device, t.dtype)].append(t)
    for tensors in groups.values():        # one per device, unless fp64 meets fp32
        flat = _flatten_dense_tensors(tensors)
        flat = flat.to(_collective_device(group, flat.device))
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(reduced)


def all_agree(group, ok: bool, device: torch.device) -> bool:
    """True on every rank if `ok` is True on every rank of the group."""
    import torch.distributed as dist
    flag = torch.tensor([0.0 if ok else 1.0], device=_collective_device(group, device))
    dist.all_reduce(flag, group=group)
    return flag.item() == 0.0

"""bSAM under FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters that are DTensors
sharded along dim 0, each rank holding a block of rows of every parameter.

The semantics (see the README's distributed section): the forward pass all-gathers the
full parameters, so every rank evaluates the *same* noisy and perturbed points, and the
gradients FSDP2 reduce-scatters are the global-batch means. A step therefore equals the
single-process step on the global batch with the same noise, which requires the noise of
an element to be keyed by its index in the full (unsharded) tensor: a shard's noise base
is the full tensor's base plus the shard's first element. That offset need not be a
multiple of 4 (rows of odd length); such shards are drawn in their own buckets (see
``plan.buckets_of``). Every rank uses the same stream (rank 0's seed); only the
inf/NaN flags are shared (one all-reduce per step); u needs no reduction, as the
gradients are global already.

The optimizer works on the local shards (``local``) and keys its state by the DTensor
parameter; its ``state_dict()`` hands the state out as DTensors laid out like their
parameters, so that ``torch.distributed.checkpoint`` saves it sharded and can load it
onto another number of ranks; ``load_state_dict`` takes DTensors (of any placement on
the parameters' mesh), full tensors or local shards.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor


def is_sharded(t) -> bool:
    """True for a DTensor (FSDP2 parameters, their gradients and state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                       # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage: in-place writes reach the
    DTensor), a plain tensor as it is."""
    return t._local_tensor if is_sharded(t) else t


def unsupported_reason(p: Tensor) -> Optional[str]:
    """None for a parameter sharded the way FSDP2's ``fully_shard`` shards it (Shard(0) on
    a one-dimensional mesh), else why BSAM cannot take it."""
    from torch.distributed.tensor import Shard
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        return (f"a DTensor parameter with placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh: BSAM takes FSDP2's fully_shard parameters "
                "(Shard(0) on a 1-D mesh); tensor parallelism and HSDP are not supported, "
                "as noise and state are indexed by a parameter's rows")
    return None


def shard_start(p: Tensor) -> int:
    """Index, in the full tensor (row-major), of the local shard's first element (0 for a
    plain tensor: it is whole)."""
    if not is_sharded(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(local_shape) != tuple(local(p).shape):
        raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} holds a local shard of "
                         f"shape {tuple(local(p).shape)}, not the {tuple(local_shape)} of its "
                         "placements")
    return int(offset[0]) * math.prod(p.shape[1:]) if len(p.shape) else 0


def mesh_group(params: Sequence[Tensor]):
    """The process group of the sharded parameters' mesh (None if none is sharded); one
    mesh for all of them, else ValueError."""
    meshes = []                  # fully_shard makes a mesh per call: equal ones are one
    for p in params:
        if is_sharded(p) and not any(p.device_mesh == mesh for mesh in meshes):
            meshes.append(p.device_mesh)
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("BSAM's parameters are sharded over more than one device mesh; "
                         "fully_shard them all over one mesh (one noise stream per step)")
    return meshes[0].get_group()


def owning_modules(params: Sequence[Tensor]) -> list:
    """The FSDP2 modules (``fully_shard``-ed) that manage any of these parameters, found in
    torch's registry of composable states (private; an empty list if it moved)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    ours = {id(p) for p in params}
    found = []
    for module, state_ref in list(_module_state_mapping.items()):
        state = state_ref() if callable(state_ref) else state_ref
        if not isinstance(module, FSDPModule) or state is None:
            continue
        groups = getattr(state, "_fsdp_param_groups", None) or []
        if any(id(fp.sharded_param) in ours for g in groups for fp in g.fsdp_params):
            found.append(module)
    return found


def reshard(modules) -> None:
    """Reshard FSDP2 modules (a no-op for those resharded already). FSDP2 keeps the root
    module's parameters gathered after a forward pass without backward (an evaluation),
    and its next forward then reuses them: BSAM calls this before it writes the shards
    (noise, samples) so that the next forward gathers what it wrote."""
    for module in modules:
        module.reshard()


def reshard_model(model) -> None:
    """Reshard every FSDP2 module of `model` (see ``reshard``; for helpers given the model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    reshard([m for m in model.modules() if isinstance(m, FSDPModule)])


def as_dtensor_like(t: Tensor, p: Tensor) -> Tensor:
    """A local state tensor of parameter p as a DTensor laid out like p (shared storage)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def local_like(t: Tensor, p: Tensor) -> Tensor:
    """A saved state tensor for parameter p as p's local shard: a DTensor is laid out like
    p first (a checkpoint of another sharding), a plain tensor of p's full shape is cut to
    p's rows, one of p's local shape is taken as it is."""
    if is_sharded(t):
        if not is_sharded(p):                   # a sharded checkpoint, an unsharded optimizer
            return t.full_tensor()
        if tuple(t.placements) != tuple(p.placements):
            t = t.redistribute(t.device_mesh, p.placements)
        return local(t)
    if is_sharded(p) and tuple(t.shape) == tuple(p.shape) != tuple(local(p).shape):
        return rows_of(t, p)
    return t


def rows_of(full: Tensor, p: Tensor) -> Tensor:
    """The rows of a tensor of p's full shape that p's local shard holds (a view)."""
    start, shard = shard_start(p), local(p)
    return full.reshape(-1)[start:start + shard.numel()].view(shard.shape)


__all__ = ["is_sharded", "local", "unsupported_reason", "shard_start", "mesh_group",
           "owning_modules", "reshard", "reshard_model", "as_dtensor_like", "local_like", "rows_of"]

"""Validation of what users hand to ``BSAM``: hyperparameters, parameters, noise and
gradients. Every check raises an error that names the offending value, before anything
is changed."""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from .sharded import is_sharded, local, local_like, mesh_group, unsupported_reason


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def warn_user(message: str, category: type = RuntimeWarning) -> None:
    """warnings.warn, attributed to the first frame outside bsam_fast and torch (the user's
    line, whatever wrappers torch.optim, torch.compile or a trainer put between)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def listed(params) -> list:
    """The constructor's params as lists (a generator, also a group's, can be read twice)."""
    if isinstance(params, Tensor):
        return params                       # torch.optim's error names it
    return [dict(g, params=[g["params"]] if isinstance(g["params"], Tensor) else list(g["params"]))
            if isinstance(g, dict) and "params" in g else g for g in params]


def tensors_in(groups) -> list[Tensor]:
    """The tensors among the constructor's params (groups, tensors, (name, tensor) pairs)."""
    items = [x for g in groups for x in (g.get("params", []) if isinstance(g, dict) else [g])]
    items = [x[1] if isinstance(x, tuple) and len(x) == 2 else x for x in items]
    return [x for x in items if isinstance(x, Tensor)]


HYPERPARAMETERS = ("lr", "num_data", "rho", "betas", "weight_decay", "damping", "s_init")


def _number(group: dict, name: str, read_tensors: bool) -> Optional[float]:
    """A hyperparameter as a float (None for a tensor left unread); one-element tensors only."""
    value = group[name]
    if isinstance(value, Tensor) and name not in ("lr", "rho"):
        raise ValueError(f"Invalid {name}: a tensor (only lr and rho may be tensors)")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        return float(value.item()) if read_tensors else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number)")
    return float(value)


def check_hyperparameters(group: dict, read_tensors: bool = True) -> None:
    """ValueError naming the first invalid (or missing) hyperparameter of a param group.

    read_tensors=False leaves the values of tensor lr/rho unread (no host synchronisation:
    the per-step check)."""
    missing = [k for k in HYPERPARAMETERS if k not in group]
    if missing:
        raise ValueError(f"param group lacks the BSAM hyperparameters {missing}")
    for name, low, strict in (("lr", 0.0, False), ("num_data", 0.0, True), ("rho", 0.0, False),
                              ("weight_decay", 0.0, False), ("damping", 0.0, False),
                              ("s_init", 0.0, True)):
        value = _number(group, name, read_tensors)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (strict and value == low):
            rule = f"must be finite and {'>' if strict else '>='} {low:g}"
            extra = ": the number of training examples N" if name == "num_data" else ""
            raise ValueError(f"Invalid {name}: {value} ({rule}{extra})")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta{i + 1} (betas[{i}]): {beta} (must be in [0, 1))")


def check_max_grad_norm(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid max_grad_norm: {value!r} (None, or a finite number > 0)")
    return float(value)


def check_parameter(p: Tensor) -> None:
    if is_sharded(p):
        reason = unsupported_reason(p)
        if reason is not None:
            raise ValueError(f"BSAM cannot take {reason}. Use FSDP2 (fully_shard) or "
                             "DistributedDataParallel with BSAM(..., process_group=...) (see README).")
        p = local(p)
    if p.is_complex():
        raise ValueError("BSAM does not support complex parameters (got dtype "
                         f"{p.dtype}); use torch.view_as_real to optimise the real parts")
    if not p.is_floating_point():
        raise ValueError(f"BSAM only optimises floating-point parameters, got dtype {p.dtype}")
    if p.is_sparse:
        raise ValueError("BSAM does not support sparse parameters")
    if p.device.type == "meta":
        raise ValueError(f"a parameter of shape {tuple(p.shape)} is on the meta device (no storage): "
                         "materialise the model first (model.to_empty(device=...) and "
                         "reset_parameters(), or load its weights), then build BSAM")
    if p.numel() and any(stride == 0 and size > 1 for stride, size in zip(p.stride(), p.shape)):
        raise ValueError(f"a parameter of shape {tuple(p.shape)} has stride {p.stride()}: its "
                         "elements share memory (an expand()ed tensor); pass a tensor that owns "
                         "its elements (e.g. p.contiguous())")


def check_backend_takes(backend, params: Sequence[Tensor]) -> None:
    """Each parameter (this process's shard of it) is one the backend can step."""
    for p in params:
        reason = backend.supports(local(p))
        if reason is not None:
            raise ValueError(f"backend {backend.name!r} cannot handle a parameter: {reason}")


def check_group(group: dict, backend, shard_group, constructed: bool) -> None:
    """A param group joining: its hyperparameters (betas made a tuple) and parameters.
    FSDP2-sharded ones join at construction, on the optimizer's mesh."""
    check_hyperparameters(group)
    group["betas"] = tuple(group["betas"])
    check_unique(group["params"])
    for p in group["params"]:
        check_parameter(p)
    check_backend_takes(backend, group["params"])
    mesh = mesh_group(group["params"])
    if mesh is not None and (constructed or mesh is not shard_group):
        raise ValueError("FSDP2-sharded parameters join a BSAM at construction (its mesh, seed and shared "
                         "flags are set up there), all on one mesh")


def check_seed(seed) -> int:
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**64))")
    return seed


def check_options(backend, capturable: bool, max_grad_norm: Optional[float], sharded: bool) -> None:
    """The constructor's options that exclude one another."""
    if sharded and max_grad_norm is not None:
        raise ValueError("max_grad_norm is not supported with FSDP2-sharded parameters (the norm "
                         "spans the ranks' shards): clip the DTensor gradients with "
                         "torch.nn.utils.clip_grad_norm_ before step() in the phase API")
    if capturable and not backend.device_side:
        raise ValueError(f"capturable=True needs a fused backend ('cuda' or 'cpu'), not {backend.name!r}")


def check_unique(params: Sequence[Tensor]) -> None:
    """A parameter listed twice would get noise and updates twice (tied weights: list each
    tensor once)."""
    seen = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) appears twice in the "
                             "param group; list each tensor once (tied weights share one entry)")
        seen.add(id(p))


def check_noise(noise: Sequence[Tensor], params: list[Tensor]) -> list[Tensor]:
    """noise given to sample_noise(): one floating tensor per parameter, its shape and device."""
    noise = list(noise)
    if len(noise) != len(params):
        raise ValueError(f"noise: expected {len(params)} tensors (one per parameter), got {len(noise)}")
    for i, (xi, p) in enumerate(zip(noise, params)):
        if is_sharded(p):                 # the rows of this rank's shard
            if isinstance(xi, Tensor):
                xi = noise[i] = local_like(xi, p)
            p = local(p)
        if not isinstance(xi, Tensor) or xi.shape != p.shape:
            raise ValueError(f"noise[{i}]: expected a tensor of shape {tuple(p.shape)}, "
                             f"got {getattr(xi, 'shape', type(xi).__name__)}")
        if not xi.is_floating_point():
            raise ValueError(f"noise[{i}]: expected a floating-point tensor, got {xi.dtype}")
        if xi.device != p.device:
            raise ValueError(f"noise[{i}]: expected device {p.device}, got {xi.device}")
    return noise


def check_gradients(params: list[Tensor]) -> list[Tensor]:
    """The gradients of `params` (each has one), or a RuntimeError naming what is wrong.

    A gradient of another floating dtype than its parameter, or not contiguous, is given
    to the backends converted to the parameter's dtype and contiguous: every backend then
    sees the same input (and gives the same result)."""
    grads = []
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("BSAM does not support sparse gradients; use a dense "
                               "gradient (e.g. nn.Embedding(sparse=False))")
        if p.grad.is_complex() or p.grad.shape != p.shape:
            raise RuntimeError(f"gradient of shape {tuple(p.grad.shape)} / dtype "
                               f"{p.grad.dtype} does not match its parameter "
                               f"{tuple(p.shape)} / {p.dtype}")
        g = p.grad
        if is_sharded(p):                 # this rank's rows of both
            if not is_sharded(g) or tuple(g.placements) != tuple(p.placements):
                raise RuntimeError("the gradient of an FSDP2 parameter must be a DTensor laid out "
                                   f"like it ({tuple(p.placements)}), got "
                                   f"{tuple(g.placements) if is_sharded(g) else 'a plain tensor'}")
            g, p = local(g), local(p)
        if g.dtype != p.dtype or not g.is_contiguous():
            if not g.is_floating_point():
                raise RuntimeError(f"gradient of dtype {g.dtype} for a {p.dtype} parameter")
            g = g.to(p.dtype).contiguous()
        if g.device != p.device:
            raise RuntimeError(f"gradient on {g.device} for a parameter on {p.device}")
        grads.append(g)
    return grads


def check_state_dict(state_dict: dict, params: list[Tensor]) -> None:
    """Everything a BSAM state_dict must hold for these parameters, checked before any of it
    is loaded (a refused load changes nothing): ValueError naming the first problem. State
    tensors of FSDP2 parameters are given as local shards (``sharded.local_like``)."""
    missing = [k for k in ("state", "param_groups", "noise") if k not in state_dict]
    if missing:
        raise ValueError(f"not a BSAM state_dict: missing {missing} (torch.distributed.checkpoint's "
                         "flatten_optimizer_state_dict=True drops the noise position: use the default)"
                         if missing == ["noise"] else f"not a BSAM state_dict: missing {missing}")
    groups = state_dict["param_groups"]
    saved_ids = [i for g in groups for i in g["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(f"state_dict has {len(saved_ids)} parameters, this optimizer {len(params)}")
    for k, g in enumerate(groups):
        try:
            check_hyperparameters(g)
        except ValueError as exc:
            raise ValueError(f"state_dict param_groups[{k}]: {exc} (a checkpoint of another "
                             "optimizer?)") from None
    noise = state_dict["noise"]
    if not isinstance(noise, dict) or not {"seed", "offset"} <= set(noise):
        raise ValueError("state_dict['noise'] must be a dict with 'seed' and 'offset'")
    seed, offset = noise["seed"], noise["offset"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"state_dict noise seed {seed!r} must be an int in [0, 2**64)")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2 ** 63:
        raise ValueError(f"state_dict noise offset {offset!r} must be an int in [0, 2**63)")
    skipped = state_dict.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"state_dict skipped_steps {skipped!r} must be an int >= 0")
    for i, p in zip(saved_ids, params):
        st = state_dict["state"].get(i)
        if not st:
            continue                         # no step taken yet for this parameter
        names = {"momentum", "precision"} | ({"mean"} if p.dtype in (torch.float16, torch.bfloat16) else set())
        lacking = sorted(names - set(st))
        if lacking:
            raise ValueError(f"state of parameter {i} lacks {lacking}")
        for name in sorted(names):
            t = st[name]
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != local(p).shape:
                raise ValueError(f"state of parameter {i}: {name} must be a floating tensor of shape "
                                 f"{tuple(local(p).shape)} like its parameter, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state of parameter {i}: {name} holds inf or NaN")
        if not bool((st["precision"] > 0).all()):
            raise ValueError(f"state of parameter {i}: precision must be > 0 everywhere")

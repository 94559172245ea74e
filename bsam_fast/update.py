"""Phase 3 of a bSAM step, as ``BSAM.step()`` runs it once the perturbed gradients are
accepted: the skip of a step whose gradients are not finite, and the update.

* On a fused backend the step never waits for the device: the inf/NaN flags of every
  device (and a GradScaler's) are summed into one flag on the device, the kernels skip the
  step where it is non-zero (on all devices or none), a device counter counts it, and the
  flags are kept for a report read when ready (``StepState.poll_device_skip``).
* On the other backends (``foreach``, ``reference``) the flags are read on the host.

Either way a skipped step changes no mean, momentum or precision, and the parameters go
back to the mean. Every bucket is computed (``prepare_update``) before any is written.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import distributed, phases
from ._checks import warn_user
from .backends.base import Backend
from .step_state import StepState


def reduce_across_ranks(st: StepState, ddp_group, shard_group) -> None:
    """DDP: u and the noisy inf/NaN flags summed over the ranks (the perturbed gradients
    are DDP's to reduce); FSDP2: every flag shared (each rank checked its own rows)."""
    if ddp_group is not None:
        u_sums = [u for _, buckets in st.active_work for b in buckets for u in b.u_sums]
        devices = dict.fromkeys([u.device for u in u_sums] + list(st.found["noisy"]))
        distributed.all_reduce_u_and_flags(ddp_group, u_sums, [st.found_flag("noisy", d) for d in devices])
    elif shard_group is not None:
        distributed.all_reduce_u_and_flags(shard_group, [], st.all_found_flags())


def inverse_scale_of(grad_scaler) -> Tensor:
    """1/scale of the enabled GradScaler given to perturb()."""
    scale = getattr(grad_scaler, "_scale", None)
    if scale is None:
        raise RuntimeError("perturb(grad_scaler=...): the scaler has not scaled a "
                           "loss yet (call scaler.scale(loss).backward() first)")
    return phases.inverse(scale)


def keep_scaler(st: StepState, grad_scaler) -> Optional[Tensor]:
    """perturb(grad_scaler=...): 1/scale of an enabled scaler, kept for step() (the
    perturbed gradients carry the same scale, also when the step is finished by opt.step()
    rather than scaler.step(opt)); None without one."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    st.scaler_inv_scale, st.scaler = inverse_scale_of(grad_scaler), grad_scaler
    return st.scaler_inv_scale


def unscaled_by(scaler, optimizer) -> bool:
    """True if `scaler` (the GradScaler perturb() saw) has unscaled the optimizer's
    gradients since its last update() (``scaler.unscale_(opt)``, e.g. to clip)."""
    if scaler is None:
        return False
    from torch.amp.grad_scaler import OptState
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    return state is not None and state.get("stage") is OptState.UNSCALED


def tell_scaler_of_noisy_overflow(st: StepState, optimizer) -> None:
    """A GradScaler driving the step (scaler.step(optimizer)) checked the perturbed
    gradients only: an inf/NaN in the noisy gradient is added to the scaler's found_inf
    (on the device), so that scaler.update() backs off as for any overflow and a trainer
    that watches the scale (accelerate's step_was_skipped, and so the LR scheduler of a
    Hugging Face Trainer) sees the step as skipped."""
    state = getattr(st.scaler, "_per_optimizer_states", {}).get(id(optimizer))
    found = (state or {}).get("found_inf_per_device") or {}
    noisy = list(st.found["noisy"].values())
    if found and noisy:
        first = next(iter(found.values()))
        first.add_(phases.total_flag(noisy, first.device).reshape(first.shape))


def perturbed_inv_scale(st: StepState, set_by_scaler: bool, grad_scale: Optional[Tensor],
                        unscaled: bool) -> Optional[Tensor]:
    """1/scale of the perturbed gradients, or None: scaler.step(opt) sets grad_scale (None
    when scaler.unscale_(opt) came first: the gradients are unscaled already); a step
    finished by opt.step() after perturb(grad_scaler=) uses the scale perturb() saw."""
    if set_by_scaler:
        return None if grad_scale is None else phases.inverse(grad_scale)
    return None if unscaled else st.scaler_inv_scale


def _commit(backend: Backend, st: StepState, grads, u_factor: float, inv_scale: Optional[Tensor],
            skip_flag=None, clip: Optional[Tensor] = None) -> None:
    commits = phases.prepare_updates(backend, st.active_work, grads, st.parts, u_factor, inv_scale, skip_flag,
                                     clip)
    phases.restore(backend, st.idle_work)          # sampled, but no gradient: back to the mean
    for commit in commits:
        commit()


def update_on_device(backend: Backend, st: StepState, grads, u_factor: float, inv_scale: Optional[Tensor],
                     scaler_found: Optional[Tensor], watch: bool, clip: Optional[Tensor] = None) -> None:
    """The update, skipped on the device if any flag is set; watch: keep the flags for a
    report (the default step; a GradScaler's skips are its own business)."""
    counter = st.device_skipped
    noisy_flags, perturbed_flags = list(st.found["noisy"].values()), list(st.found["perturbed"].values())
    every = noisy_flags + perturbed_flags + ([scaler_found] if scaler_found is not None else [])
    if not every:                                       # nothing to check: never skip
        _commit(backend, st, grads, u_factor, inv_scale, clip=clip)
        return
    home = counter.device if counter is not None else every[0].device
    noisy = phases.total_flag(noisy_flags, home)
    perturbed = phases.total_flag(perturbed_flags, home)
    total = phases.total_flag([f for f in (noisy, perturbed, scaler_found) if f is not None], home)
    st.count_device_skip(total)
    per_device = {home: total}

    def skip_flag(device: torch.device) -> Tensor:
        if device not in per_device:
            per_device[device] = total.to(device)
        return per_device[device]
    _commit(backend, st, grads, u_factor, inv_scale, skip_flag, clip)
    if watch:
        zero = torch.zeros((), device=home)
        st.watch_device_skip(zero if noisy is None else noisy, zero if perturbed is None else perturbed)


def update_on_host(backend: Backend, st: StepState, grads, u_factor: float, inv_scale: Optional[Tensor],
                   scaler_found: Optional[Tensor], clip: Optional[Tensor] = None) -> Optional[str]:
    """The update, or a skip decided on the host: returns None, or what was not finite
    ("noisy", "perturbed" or "scaler"; the parameters are then back at the mean)."""
    bad = ("noisy" if any(f.item() for f in st.found["noisy"].values())
           else "perturbed" if any(f.item() for f in st.found["perturbed"].values())
           else "scaler" if scaler_found is not None and bool(scaler_found.item()) else None)
    if bad is not None:
        phases.restore(backend, st.sampled)
        st.skipped += 1
        return bad
    _commit(backend, st, grads, u_factor, inv_scale, clip=clip)
    return None


def finish(backend: Backend, st: StepState, grads, optimizer, *, max_grad_norm: Optional[float], world_size: int,
           ddp_group, shard_group, capturable: bool) -> None:
    """Phase 3 once the perturbed gradients (`grads`) are accepted: reduce across ranks,
    then update, or skip (with a warning when the host decided it, unless a GradScaler
    drives the step). GradScaler: ``grad_scale``/``found_inf`` are read as
    ``scaler.step(optimizer)`` set them on the optimizer; ``scaler.unscale_(optimizer)``
    may have come first."""
    scaler_found = getattr(optimizer, "found_inf", None)
    grad_scale_set = hasattr(optimizer, "grad_scale")
    if st.scaler is not None and scaler_found is not None:       # scaler.step(opt)
        tell_scaler_of_noisy_overflow(st, optimizer)
    reduce_across_ranks(st, ddp_group, shard_group)
    inv_scale = perturbed_inv_scale(st, grad_scale_set, getattr(optimizer, "grad_scale", None),
                                    unscaled_by(st.scaler, optimizer))
    u_factor = 1.0 / (st.parts * world_size)      # u_sums were summed over ranks
    scaled = st.used_scaler or grad_scale_set or scaler_found is not None
    clip = None
    if max_grad_norm is not None and any(g for group_grads in grads for g in group_grads):
        clip = phases.clip_coefficient(grads, st.parts, inv_scale, max_grad_norm)
    report = None
    if backend.device_side:
        # (Under capturable=True nothing is watched: a graph replays the step, and an
        # event queried inside a capture would break it.)
        update_on_device(backend, st, grads, u_factor, inv_scale, scaler_found, watch=not (scaled or capturable),
                         clip=clip)
    else:
        bad = update_on_host(backend, st, grads, u_factor, inv_scale, scaler_found, clip)
        if bad is not None and not scaled:
            # A non-finite noisy gradient makes the perturbed point, and so the perturbed
            # gradient, non-finite too: the first one is named.
            report = (bad, st.skipped_steps)
    st.begin()
    if report is not None:
        warn_skipped(*report)


def report_device_skip(st: StepState) -> None:
    """Say so if a step the device skipped has become known (never waits for it)."""
    report = st.poll_device_skip()
    if report is not None:
        warn_skipped(*report)


def forget_scaler_step(optimizer) -> None:
    """Drop the grad_scale/found_inf that GradScaler.step() set on the optimizer: the
    scaler removes them only when step() returns, and a later step must not read them."""
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("found_inf", None)


def warn_skipped(which: str, count: int, new: int = 1) -> None:
    what = "a step" if new == 1 else f"{new} steps"
    warn_user(f"BSAM: skipped {what}: the {which} gradient holds inf or NaN; "
              f"mean, momentum and precision are unchanged ({count} skipped so far)")

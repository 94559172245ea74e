"""Phase 3 of a bSAM step: the inf/NaN checks, the skip of a step whose gradients are not
finite (on the host, or on the device without a synchronisation: the device-side path of
capturable and GradScaler steps), and the posterior update by the backend.

A mixin of ``BSAM`` (``optimizer.py``): it reads the optimizer's step state, buckets and
backend.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import Tensor

from . import distributed
from .backends.base import Bucket


def _inverse(scale: Tensor) -> Tensor:
    """1/scale of a GradScaler's scale, on its device, as float32 (computed in float64)."""
    return scale.double().reciprocal().float()


def _grad_factor(inv_scale: Tensor, m: int, b: Bucket) -> Tensor:
    """inv_scale / m on the bucket's device, in its opmath dtype (float64 for float64
    parameters: every backend reads the factor in the arithmetic's precision)."""
    return inv_scale.to(device=b.device, dtype=torch.float64).div(m).to(b.means[0].dtype)


def _scalar(value):
    """A one-element tensor hyperparameter (lr, rho) as a 0-dim view (the backends broadcast
    it over 0-dim and larger parameters alike); a float as it is."""
    return value.reshape(()) if isinstance(value, Tensor) else value


def _unscaled_by(scaler, optimizer) -> bool:
    """True if `scaler` (the GradScaler perturb() saw) has unscaled the optimizer's
    gradients since its last update() (``scaler.unscale_(opt)``, e.g. to clip)."""
    if scaler is None:
        return False
    from torch.amp.grad_scaler import OptState
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    return state is not None and state.get("stage") is OptState.UNSCALED


class UpdatePhase:
    @torch.no_grad()
    def _finish(self) -> None:
        """Phase 3: update momentum, mean and precision, and put the mean back in place.

        ``.grad`` holds the sum of the m perturbed gradients (DDP: averaged over ranks).
        An error on the way cancels the step (parameters back at the mean) and is raised."""
        grads = self._check_perturbed_gradients()
        try:
            self._check_and_update(grads)
        except BaseException:
            self.cancel_step()
            self._forget_scaler_step()
            raise

    def _forget_scaler_step(self) -> None:
        """Drop the grad_scale/found_inf that GradScaler.step() set on the optimizer: the
        scaler removes them only when step() returns, and a later step must not read them."""
        self.__dict__.pop("grad_scale", None)
        self.__dict__.pop("found_inf", None)

    def _check_and_update(self, grads: dict[int, Tensor]) -> None:
        m = self._state.parts
        for params in self._state.active:
            # One list per device and dtype: the kernels take one dtype per call.
            by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in params:
                by_kind[(p.device, p.dtype)].append(grads[id(p)])
            for (device, _), kind in by_kind.items():
                self._backend.check_finite(kind, self._state.found_flag("perturbed", device))
        if self._group is not None:
            u_sums = [self._scratch[p]["u"] for params in self._state.active for p in params]
            devices = dict.fromkeys([u.device for u in u_sums] + list(self._state.found["noisy"]))
            distributed.all_reduce_u_and_flags(self._group, u_sums,
                                               [self._state.found_flag("noisy", d) for d in devices])
        elif self._shard_group is not None:
            # FSDP2: each rank checked its own rows; all skip if any found inf/NaN.
            distributed.all_reduce_u_and_flags(self._shard_group, [], self._state.all_found_flags())
        scaler_found = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if self._backend.device_side and (self._capturable or self._state.used_scaler
                                          or grad_scale is not None or scaler_found is not None):
            self._update_skipping_on_device(m, grads, grad_scale, scaler_found)
            return
        bad_noisy = any(f.item() for f in self._state.found["noisy"].values())
        bad_perturbed = any(f.item() for f in self._state.found["perturbed"].values())
        bad_scaler = scaler_found is not None and bool(scaler_found.item())
        if bad_noisy or bad_perturbed or bad_scaler:
            self._restore_all()
            self._state.skipped += 1
            if not (self._state.used_scaler or bad_scaler or grad_scale is not None):
                # A non-finite noisy gradient makes the perturbed point, and so the
                # perturbed gradient, non-finite too: name the first one.
                which = "noisy" if bad_noisy else "perturbed"
                warnings.warn(f"BSAM: skipped a step: the {which} gradient holds inf or NaN; "
                              "mean, momentum and precision are unchanged "
                              f"({self.skipped_steps} skipped so far)", RuntimeWarning,
                              stacklevel=3)
            self._state.begin()
            return
        self._apply_update(m, grads, grad_scale)

    def _update_skipping_on_device(self, m: int, grads: dict[int, Tensor], grad_scale: Optional[Tensor],
                                   scaler_found: Optional[Tensor]) -> None:
        """The update with no host synchronisation (capturable, GradScaler): the inf/NaN
        flags of every device (and the scaler's) are summed into one flag, so the kernels
        skip the step on all devices or on none, and it is counted once."""
        flags = self._state.all_found_flags()
        if scaler_found is not None:
            flags.append(scaler_found)
        counter = self._state.device_skipped
        home = counter.device if counter is not None else flags[0].device if flags else None
        total = None
        for flag in flags:
            flag = flag.to(device=home, dtype=torch.float32)
            total = flag if total is None else total + flag
        if total is None:                                  # nothing to check: never skip
            self._apply_update(m, grads, grad_scale)
            return
        self._state.count_device_skip(total)
        per_device: dict[torch.device, Tensor] = {home: total}

        def skip_flag(device: torch.device) -> Tensor:
            if device not in per_device:
                per_device[device] = total.to(device)
            return per_device[device]
        self._apply_update(m, grads, grad_scale, skip_flag)

    def _apply_update(self, m: int, grads: dict[int, Tensor], grad_scale: Optional[Tensor],
                      skip_flag: Optional[Callable[[torch.device], Tensor]] = None) -> None:
        """Mean back into the parameters without a gradient; the posterior update for the
        rest (skipped on the device where skip_flag(device) is non-zero)."""
        u_factor = 1.0 / (m * self._world_size)      # u_sums were summed over ranks
        # The perturbed gradients' scale: scaler.step(opt) sets grad_scale (None when
        # scaler.unscale_(opt) came first: the gradients are unscaled already); a step
        # finished by opt.step() after perturb(grad_scaler=) uses the scale perturb() saw.
        if hasattr(self, "grad_scale"):
            inv_scale = None if grad_scale is None else _inverse(grad_scale)
        elif _unscaled_by(self._state.scaler, self):       # scaler.unscale_(opt); opt.step()
            inv_scale = None
        else:
            inv_scale = self._state.scaler_inv_scale
        commits = []           # every bucket computed before any is written (see Backend)
        for group, params in zip(self.param_groups, self._state.active):
            beta1, beta2 = group["betas"]
            for b in self._buckets(group, params):
                factor = 1.0 / m if inv_scale is None else _grad_factor(inv_scale, m, b)
                commits.append(self._backend.prepare_update(
                    b, [grads[key] for key in b.keys], factor, u_factor, _scalar(group["lr"]), beta1, beta2,
                    group["weight_decay"], group["damping"],
                    skip_if=None if skip_flag is None else skip_flag(b.device)))
        for group, sampled, params in zip(self.param_groups, self._state.sampled, self._state.active):
            active_ids = {id(p) for p in params}
            for b in self._buckets(group, [p for p in sampled if id(p) not in active_ids]):
                self._backend.restore(b)
        for commit in commits:
            commit()
        self._state.begin()

    def _restore_all(self) -> None:
        """Parameters of the step in progress back to their mean."""
        for group, sampled in zip(self.param_groups, self._state.sampled):
            for b in self._buckets(group, sampled):
                self._backend.restore(b)

"""`BSAM`: Bayesian-SAM as a ``torch.optim.Optimizer``.

The public API: constructor, phases (``sample_noise``, ``perturb``, ``step``), the
closure drivers (``step``, ``step_parts``), the posterior, checkpoints. The optimizer owns
the tensor state (momentum, precision and, for bf16/fp16 parameters, an fp32 master mean)
and the buckets the backends work on; the step machine and counters are one
``StepState`` (``step_state.py``); the arithmetic lives in ``backends/``; the distributed
hooks in ``distributed.py``; argument checks in ``_checks.py``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, sharded
from ._checks import (check_gradients, check_hyperparameters, check_noise, check_parameter,
                      check_state_dict, check_unique)
from .backends import make_backend
from .backends.base import opmath_dtype
from .noise import noise_bases, seed_from_default_generator, stream_seed
from .posterior import PosteriorMethods
from .sharded import local
from .step_state import IDLE, NOISY, PERTURBED, StepState
from .gradients import StepGradients
from .tensor_state import TensorState
from .update import UpdatePhase, _inverse, _scalar


def split_batch(*tensors: Tensor, m: int) -> list[tuple[Tensor, ...]]:
    """Split tensors along dim 0 into m equal parts: [(x_0, y_0, ...), ...].

    Raises ValueError if m < 1 or the batch size is not divisible by m.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
    if not tensors:
        raise ValueError("split_batch needs at least one tensor")
    size = tensors[0].shape[0]
    for t in tensors:
        if t.shape[0] != size:
            raise ValueError(f"split_batch: tensors disagree on the batch size "
                             f"({t.shape[0]} vs {size})")
    if size % m:
        raise ValueError(f"Invalid m: a batch of {size} is not divisible into m={m} parts")
    return list(zip(*(t.chunk(m) for t in tensors)))


STREAM_KEY = "bsam_stream"
UNSTEPPED_KEY = "unstepped"


def _normalised(state_dict: dict, params: list[Tensor]) -> dict:
    """A state_dict as ``load_state_dict`` reads it: the stream's position at the top level
    (also when only the copy in the first param group came through), no copy left in the
    groups, and the state of FSDP2 parameters as this rank's local shards."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
        return state_dict                                  # check_state_dict names it
    out = dict(state_dict)
    stream = next((g[STREAM_KEY] for g in groups if isinstance(g, dict) and STREAM_KEY in g), None)
    if stream is not None:
        out.setdefault("noise", {"seed": stream.get("seed"), "offset": stream.get("offset")})
        out.setdefault("skipped_steps", stream.get("skipped_steps", 0))
    out["param_groups"] = [{k: v for k, v in g.items() if k != STREAM_KEY} if isinstance(g, dict) else g
                           for g in groups]
    saved_ids = [i for g in out["param_groups"] if isinstance(g, dict) for i in g.get("params", [])]
    if any(sharded.is_sharded(p) for p in params) or any(
            sharded.is_sharded(v) for st in state_dict["state"].values() if isinstance(st, dict)
            for v in st.values()):
        out["state"] = {i: ({k: sharded.local_like(v, p) if isinstance(v, Tensor) else v
                             for k, v in state_dict["state"][i].items()}
                            if isinstance(state_dict["state"].get(i), dict) else state_dict["state"].get(i))
                        for i, p in zip(saved_ids, params) if i in state_dict["state"]}
    return out


class BSAM(TensorState, StepGradients, UpdatePhase, PosteriorMethods, Optimizer):
    r"""Bayesian-SAM (Möllenhoff & Khan, ICLR 2023): SAM as an optimal relaxation of Bayes.

    Learns a diagonal Gaussian posterior ``N(w, 1/(N*s))`` over the parameters. Between
    steps the parameters hold the mean ``w``; ``state[p]`` holds ``momentum`` (gm) and
    ``precision`` (s), and for bf16/fp16 parameters an fp32 master copy ``mean``.

    Args:
        params: tensors, param-group dicts, or (name, tensor) pairs.
        lr: learning rate (float or one-element tensor: a tensor on the parameters' device
            is read by the kernels, so a schedule that writes it in place also drives a
            captured CUDA graph).
        num_data: N, the number of training examples; posterior variance is 1/(N*s).
        rho: SAM perturbation radius (e = rho * g / s, not normalised; float or
            one-element tensor, like lr). 0 gives the Adam-like update without SAM (but
            still with noise).
        betas: (beta1, beta2) for the momentum and the precision.
        weight_decay: delta = prior precision / N (a Gaussian prior N(0, 1/(N*delta))).
        damping: gamma, added to the precision estimate.
        s_init: initial precision.
        backend: "auto" (fastest available; see ``.backend``), "cpu", "cuda",
            "foreach" or "reference".
        seed: key of the noise stream; default: drawn from torch's default generator,
            so ``torch.manual_seed`` reproduces a run.

    Use ``step(closure)``, or the phases ``sample_noise()`` / ``perturb()`` / ``step()``
    (see the README) for m-sharpness, GradScaler, accumulation and distributed training.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | Tensor, num_data: int | float, rho: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 damping: float = 0.1, s_init: float = 1.0, *, backend: str = "auto",
                 seed: Optional[int] = None, process_group=None, capturable: bool = False):
        if not isinstance(backend, str):
            raise ValueError(f"Invalid backend: {backend!r} (expected a string)")
        defaults = dict(lr=lr, num_data=num_data, rho=rho, betas=tuple(betas),
                        weight_decay=weight_decay, damping=damping, s_init=s_init)
        check_hyperparameters(defaults)
        self._noise_base: dict[Tensor, int] = {}
        self._unstepped: set[Tensor] = set()      # state made, no step or load yet
        super().__init__(params, defaults)
        all_params = self._params()
        self._backend_request = backend
        self._backend = make_backend(backend, [local(p) for p in all_params])
        if seed is None:
            seed = seed_from_default_generator()
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**64))")
        self._group, self._rank, self._world_size = None, 0, 1
        # FSDP2: the sharded parameters' mesh, over which the inf/NaN flags are shared;
        # every rank draws rank 0's stream (see sharded.py).
        self._shard_group = sharded.mesh_group(all_params)
        if self._shard_group is not None:
            if process_group is not None:
                raise ValueError("process_group is for DistributedDataParallel (per-rank noise); "
                                 "FSDP2-sharded parameters bring their own mesh: leave it out")
            if capturable:
                raise ValueError("capturable=True is not supported with FSDP2-sharded parameters")
            seed = distributed.broadcast_seed(self._shard_group, seed, local(all_params[0]).device)
        self._fsdp_modules = sharded.owning_modules(all_params) if self._shard_group is not None else []
        if process_group is not None:
            self._group, self._rank, self._world_size, seed = distributed.join_process_group(
                process_group, seed, all_params)
        if capturable and not self._backend.device_side:
            raise ValueError(f"capturable=True needs a fused backend ('cuda' or 'cpu'), not "
                             f"{self.backend!r}")
        self._capturable = bool(capturable)
        self._scratch: dict[Tensor, dict[str, Tensor]] = {}
        self._state = StepState(seed)
        self.register_state_dict_post_hook(BSAM._add_noise_and_skips, prepend=True)
        if self._capturable:
            # Made now: made inside a graph capture, a counter's zero-fill would be replayed
            # with every step, and the host's position is stale once a graph has replayed.
            for p in all_params:
                self._state.offset_tensor(p.device)
            if all_params:
                self._state.device_skipped = torch.zeros((), dtype=torch.int64, device=all_params[0].device)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:                             # a refused group leaves the optimizer as it was
            check_hyperparameters(group)
            group["betas"] = tuple(group["betas"])
            check_unique(group["params"])
            for p in group["params"]:
                check_parameter(p)
                reason = self._backend.supports(local(p)) if hasattr(self, "_backend") else None
                if reason is not None:
                    raise ValueError(f"backend {self.backend!r} cannot handle a parameter: {reason}")
            if hasattr(self, "_shard_group") and sharded.mesh_group(self._params()) is not self._shard_group:
                raise ValueError("FSDP2-sharded parameters join a BSAM at construction (its mesh, seed "
                                 "and shared flags are set up there), all on one mesh")
            starts = [sharded.shard_start(p) for p in group["params"]]
        except Exception:
            self.param_groups.pop()
            raise
        # The stream continues after the groups before (computed from the shared dict, so
        # that a wrapper's copy of this optimizer's __dict__ cannot hold a stale end). It
        # is laid out over whole tensors (an FSDP2 parameter's numel is the full tensor's);
        # a shard's base is where its first element lies.
        end = max((base - sharded.shard_start(p) + (p.numel() + 3) // 4 * 4
                   for p, base in self._noise_base.items()), default=0)
        for p, base, start in zip(group["params"], noise_bases([p.numel() for p in group["params"]]), starts):
            self._noise_base[p] = end + base + start
        if getattr(self, "_capturable", False):
            for p in group["params"]:
                self._state.offset_tensor(p.device)
        for p in group["params"]:
            if p.requires_grad:
                self._init_state(group, p)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """Name of the backend in use (what "auto" resolved to)."""
        return self._backend.name

    @property
    def rank(self) -> int:
        """This process's rank in the optimizer's process group, or in the FSDP2 mesh's (0
        when not distributed)."""
        if self._shard_group is not None:
            import torch.distributed as dist
            return dist.get_rank(self._shard_group)
        return self._rank

    def _reshard_fsdp_modules(self) -> None:
        sharded.reshard(self._fsdp_modules)

    @property
    def noise_seed(self) -> int:
        return self._state.seed

    @property
    def noise_offset(self) -> int:
        """Number of noise draws taken so far (the stream's counter)."""
        return self._state.noise_offset

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held inf or NaN (reads the device counter of
        capturable / GradScaler steps, which synchronises)."""
        return self._state.skipped_steps

    @property
    def in_step(self) -> bool:
        """True between sample_noise() and the step() that finishes the step."""
        return self._state.in_step

    @property
    def _noise_key(self) -> int:
        seed = self._state.seed
        return seed if self._group is None else stream_seed(seed, self._rank)

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def sample_noise(self, noise: Optional[Sequence[Tensor]] = None) -> None:
        """Phase 1 of a part: put a posterior sample w + xi/sqrt(N*s) into the parameters.

        Starts a step (loading the mean from the parameters), or a further part of an
        m-part step (first banking the previous part's perturbed gradient). ``noise``:
        optional standard-normal draws xi, one tensor per parameter in param-group order;
        by default they come from the optimizer's noise stream, whose counter advances by
        one per call.
        """
        if self._state.phase == NOISY:
            raise RuntimeError("sample_noise() called twice: call perturb() after the "
                               "backward() at the noisy point")
        if noise is not None:
            noise = check_noise(noise, self._params())
        self._reshard_fsdp_modules()         # FSDP2: the next forward gathers the noisy shards
        first_part = self._state.phase == IDLE
        if not first_part:
            self._bank_perturbed_gradients()
        else:
            # Hyperparameters written into param_groups since (schedulers, users) are checked
            # here, before the step changes anything (tensor values unread: no host sync).
            for group in self.param_groups:
                check_hyperparameters(group, read_tensors=False)
            self._drop_stale_gradients()
            self._state.begin()
            # Frozen parameters (requires_grad=False) are not part of the posterior: no
            # noise, no state, left as they are.
            self._state.sampled = [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]
            self._refresh_unstepped()
            for group, params in zip(self.param_groups, self._state.sampled):
                for p in params:
                    self._init_state(group, p)
                    self._unstepped.discard(p)
        offset = self._state.offset
        index = 0
        for group, params in zip(self.param_groups, self._state.sampled):
            everyone = group["params"]
            group_noise = None if noise is None else dict(zip(map(id, everyone), noise[index:index + len(everyone)]))
            index += len(everyone)
            for b in self._buckets(group, params):
                xi = None if group_noise is None else [group_noise[key] for key in b.keys]
                counter = self._state.offset_tensor(b.device) if self._capturable else None
                self._backend.sample(b, group["num_data"], self._noise_key, offset, xi,
                                     load_mean=first_part and not b.master_mean,
                                     offset_tensor=counter)
        self._state.advance_noise()
        self._state.phase = NOISY

    @torch.no_grad()
    def perturb(self, grad_scaler=None) -> None:
        """Phase 2 of a part: read the gradient g at the noisy point, move the parameters to
        w + rho * g / s, and set ``.grad = None`` (as ``zero_grad()`` does) so that the
        next backward() gives the perturbed gradient alone. Parameters without a gradient go back to the mean and
        sit out the rest of the step.

        ``grad_scaler``: the enabled ``torch.amp.GradScaler`` that scaled this backward.
        """
        if self._state.phase != NOISY:
            raise RuntimeError("perturb() must follow sample_noise() and a backward() at "
                               "the noisy point")
        inv_scale = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            scale = getattr(grad_scaler, "_scale", None)
            if scale is None:
                self.cancel_step()
                raise RuntimeError("perturb(grad_scaler=...): the scaler has not scaled a "
                                   "loss yet (call scaler.scale(loss).backward() first)")
            inv_scale = _inverse(scale)
            # Kept for step(): the perturbed gradients carry the same scale, also when the
            # step is finished by opt.step() rather than scaler.step(opt).
            self._state.scaler_inv_scale = inv_scale
            self._state.scaler = grad_scaler
        active = [[p for p in params if p.grad is not None] for params in self._state.sampled]
        try:
            grads = {id(p): g for params in active for p, g in zip(params, check_gradients(params))}
            if self._state.parts and [[id(p) for p in a] for a in active] != \
                    [[id(p) for p in a] for a in self._state.active]:
                raise RuntimeError("perturb(): the set of parameters with gradients changed "
                                   "between the parts of one step")
        except Exception:
            self.cancel_step()
            raise
        self._reshard_fsdp_modules()         # FSDP2: the next forward gathers the perturbed shards
        first_part = self._state.parts == 0
        self._state.active = active
        for group, sampled, params in zip(self.param_groups, self._state.sampled, active):
            idle = [p for p in sampled if p.grad is None]
            for b in self._buckets(group, idle):
                self._backend.restore(b)
            for b in self._buckets(group, params):
                scale = None if inv_scale is None else inv_scale.to(b.device)
                self._backend.perturb(b, [grads[key] for key in b.keys], _scalar(group["rho"]), scale,
                                      first_part, self._state.found_flag("noisy", b.device))
        # The noisy gradient is consumed. The perturbed backward() then accumulates h_k
        # into .grad: onto nothing for part 1, onto h_1 + ... + h_(k-1) for part k, so that
        # after the last part .grad holds the sum (and DDP all-reduces the whole sum).
        for i, params in enumerate(active):
            for j, p in enumerate(params):
                p.grad = None if first_part else self._state.banked[i][j]
        self._state.banked = []
        self._state.parts += 1
        self._state.phase = PERTURBED

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, but refused (before anything changes) while ``.grad`` holds
        the perturbed gradients of earlier parts of an m-part step: zeroing would drop
        them. Zero before ``sample_noise()``; ``step_parts`` closures may zero freely."""
        if self._state.phase == PERTURBED and self._state.parts > 1 and any(
                p.grad is not None for params in self._state.active for p in params):
            raise RuntimeError("zero_grad() after perturb() of part "
                               f"{self._state.parts} would drop the perturbed gradients of the "
                               "earlier parts, which .grad holds; zero the gradients before "
                               "sample_noise() instead (or use step_parts, whose closures may zero)")
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon a step in progress: parameters back at the mean, no state changed.

        The noise stream keeps its position (draws already taken stay taken)."""
        if self._state.phase != IDLE:
            self._restore_all()
        self._state.begin()

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], Tensor]] = None,
             noise: Optional[Sequence[Tensor]] = None):
        """One bSAM step.

        With a closure (it zeroes the gradients, computes the loss, calls backward() and
        returns the loss): evaluates it at a posterior sample and at the perturbed point,
        updates, and returns the loss at the perturbed point.

        Without a closure: finishes a step begun with ``sample_noise()`` and ``perturb()``
        (this is what ``GradScaler.step(optimizer)`` calls).
        """
        if closure is None or self._state.phase == PERTURBED:
            # Finishes a step begun with the phase API. A closure passed here (Lightning's
            # manual optimization passes one that does nothing) is not called: the
            # gradients at the perturbed point are in already.
            if self._state.phase != PERTURBED:
                raise RuntimeError("step() without a closure finishes a step begun with "
                                   "sample_noise() and perturb(); pass a closure instead. "
                                   "Inside a trainer that calls optimizer.step() itself "
                                   "(Hugging Face Trainer, accelerate, Lightning 16-mixed) "
                                   "see bsam_fast.integrations.")
            if noise is not None:
                raise ValueError("noise is given to sample_noise() in the phase API")
            self._finish()
            return None
        if self._state.phase != IDLE:
            raise RuntimeError("step(closure) called between sample_noise() and perturb()")
        if hasattr(self, "grad_scale") or hasattr(self, "found_inf"):
            self._forget_scaler_step()
            raise RuntimeError("GradScaler.step(optimizer, closure) cannot drive a bSAM step (the "
                               "scaler checks the gradients before the closure makes them); use "
                               "the phase API: sample_noise(), backward, perturb(grad_scaler="
                               "scaler), backward, scaler.step(optimizer)")
        self._drop_stale_gradients(warn=False)
        try:
            self.sample_noise(noise)
            with torch.enable_grad():
                closure()
            self.perturb()
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.cancel_step()
            raise
        self._finish()
        return loss

    def step_parts(self, closure: Callable[[int], Tensor], m: int,
                   noise: Optional[Sequence[Sequence[Tensor]]] = None):
        """One m-sharpness step: ``closure(k)`` computes part k's loss and calls backward().

        Every part gets its own noise sample and its own perturbation; the update uses the
        mean of the m perturbed gradients and of the m values sqrt(s)*|g_k|. Returns the
        mean of the losses at the perturbed points.
        """
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
        if noise is not None and len(noise) != m:
            raise ValueError(f"noise: expected one list per part (m={m}), got {len(noise)}")
        if self._state.phase != IDLE:
            raise RuntimeError("step_parts() called inside a step begun with sample_noise()")
        losses = []
        self._drop_stale_gradients(warn=False)
        try:
            for k in range(m):
                self.sample_noise(None if noise is None else noise[k])
                with torch.enable_grad():
                    closure(k)
                self.perturb()
                losses.append(self._closure_onto_sum(lambda: closure(k)))
        except BaseException:
            self.cancel_step()
            raise
        self._finish()
        if all(isinstance(loss, Tensor) for loss in losses):
            return torch.stack([loss.detach() for loss in losses]).mean()
        return None

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch.optim's, plus the noise stream's position and the skipped steps: at the top
        level (``"noise"``, ``"skipped_steps"``) and, for checkpoint tools that keep only
        ``state`` and ``param_groups`` (``torch.distributed.checkpoint.state_dict``), in
        the first param group (``"bsam_stream"``). The state of an FSDP2 parameter is a
        DTensor laid out like it (sharing the optimizer's storage)."""
        if self._state.phase != IDLE:
            raise RuntimeError("state_dict() inside an unfinished bSAM step (after "
                               "sample_noise(), before step())")
        self._refresh_unstepped()
        return super().state_dict()

    @staticmethod
    def _add_noise_and_skips(optimizer: "BSAM", state_dict: dict) -> dict:
        """The first state_dict post-hook (so that users' hooks see the whole state)."""
        stream = {"seed": optimizer._state.seed, "offset": optimizer.noise_offset}
        state_dict["noise"] = dict(stream)
        state_dict["skipped_steps"] = optimizer.skipped_steps
        if state_dict["param_groups"]:
            state_dict["param_groups"][0][STREAM_KEY] = dict(stream, skipped_steps=optimizer.skipped_steps)
        for i, p in enumerate(optimizer._params()):
            if i not in state_dict["state"]:
                continue
            st = {k: sharded.as_dtensor_like(v, p) if sharded.is_sharded(p) and isinstance(v, Tensor) else v
                  for k, v in state_dict["state"][i].items()}     # a new dict: the optimizer's stays
            st[UNSTEPPED_KEY] = p in optimizer._unstepped   # the initial state: re-read at its first step
            state_dict["state"][i] = st
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        if self._state.phase != IDLE:
            raise RuntimeError("load_state_dict() inside an unfinished bSAM step")
        params = self._params()
        refused = None
        try:
            state_dict = _normalised(state_dict, params)
            check_state_dict(state_dict, params)   # before anything is loaded
        except ValueError as exc:
            refused = exc
        if self._shard_group is not None:       # each rank checked its shards: all load, or none
            if not distributed.all_agree(self._shard_group, refused is None, local(params[0]).device):
                raise refused or ValueError("another rank refused its shard of this state_dict; "
                                            "nothing was loaded")
        if refused is not None:
            raise refused
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        # torch.optim casts floating state to the parameter dtype, which would round the
        # fp32 state of bf16/fp16 parameters; load it ourselves after the groups.
        originals = {i: dict(state_dict["state"].get(i, {})) for i in saved_ids}
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            st = originals[i]
            self.state.pop(p, None)
            self._unstepped.discard(p)
            unstepped = st.pop(UNSTEPPED_KEY, False)
            if st:
                dtype = opmath_dtype(p.dtype)
                self.state[p] = {k: (v.to(device=p.device, dtype=dtype, copy=True)
                                     if isinstance(v, Tensor) else v) for k, v in st.items()}
                if unstepped:
                    self._unstepped.add(p)
        for g in self.param_groups:
            g["betas"] = tuple(g["betas"])
            for p in g["params"]:
                if p.requires_grad and p not in self.state:     # none saved: as if new
                    self._init_state(g, p)
        self._state.set_noise(int(state_dict["noise"]["seed"]), int(state_dict["noise"]["offset"]))
        self._state.set_skipped(int(state_dict.get("skipped_steps", 0)))
        self._state.begin()

"""`BSAM`: Bayesian-SAM as a ``torch.optim.Optimizer``.

A thin class: it owns the parameters' state, the step machine (``step_state.py``), the
validation of what users hand it (``_checks.py``) and the calls. ``step(closure)`` and
``step_parts`` drive the phases (``drivers.py``); a phase's work is done by the
functional core (``phases.py``, ``update.py``) over the cached step plan (``plan.py``),
through a backend (``backends/``). Checkpoints: ``checkpoint.py``; the posterior's
functions: ``posterior.py``; the collectives: ``distributed.py``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checkpoint, distributed, drivers, gradients, phases, sharded, update
from ._checks import (check_group, check_hyperparameters, check_max_grad_norm, check_noise, check_options,
                      check_parameter, check_seed, listed, tensors_in, warn_user)
from .backends import make_backend
from .noise import continued_bases, seed_from_default_generator, stream_seed
from .plan import PlanCache, StepPlan, active_work as active_work_of
from .posterior import local_posterior_std, mean_of, sampled
from .sharded import local
from .step_state import IDLE, NOISY, PERTURBED, StepState
from .tensor_state import init_state, memory_footprint


# torch.compile: the phases and drivers run eagerly (graph breaks), with their closures; the
# model's own forward and backward are what to compile (torch.compile(model)). Dynamo would
# otherwise specialise on the step machine's Python state.
_eager = torch.compiler.disable


class BSAM(Optimizer):
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
        max_grad_norm: clip the perturbed gradient (the mean over the m parts, unscaled)
            to this norm over all parameters before the update, as
            ``clip_grad_norm_`` would (on the device, no host synchronisation). The noisy
            gradient, which sets u and the perturbation, is not clipped.

    Use ``step(closure)``, or the phases ``sample_noise()`` / ``perturb()`` / ``step()``
    (see the README) for m-sharpness, GradScaler, accumulation and distributed training.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | Tensor, num_data: int | float, rho: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 damping: float = 0.1, s_init: float = 1.0, *, backend: str = "auto",
                 seed: Optional[int] = None, process_group=None, capturable: bool = False,
                 max_grad_norm: Optional[float] = None):
        if not isinstance(backend, str):
            raise ValueError(f"Invalid backend: {backend!r} (expected a string)")
        self._max_grad_norm = check_max_grad_norm(max_grad_norm)
        defaults = dict(lr=lr, num_data=num_data, rho=rho, betas=tuple(betas),
                        weight_decay=weight_decay, damping=damping, s_init=s_init)
        check_hyperparameters(defaults)
        params = listed(params)
        tensors = tensors_in(params)
        for p in tensors:
            check_parameter(p)
        # Resolved before the groups join (add_param_group checks against them).
        self._backend = make_backend(backend, [local(p) for p in tensors])
        seed = seed_from_default_generator() if seed is None else check_seed(seed)
        # DDP (process_group): per-rank noise streams; FSDP2: the sharded parameters' mesh,
        # over which the inf/NaN flags are shared (every rank draws rank 0's stream).
        (self._group, self._rank, self._world_size, self._shard_group, seed) = distributed.setup(
            tensors, seed, process_group, capturable)
        self._fsdp_modules = sharded.owning_modules(tensors) if self._shard_group is not None else []
        check_options(self._backend, capturable, self._max_grad_norm, self._shard_group is not None)
        self._capturable = bool(capturable)
        self._state = StepState(seed)
        self._noise_base: dict[Tensor, int] = {}
        self._unstepped: set[Tensor] = set()      # state made, no step or load yet
        self._scratch: dict[Tensor, dict[str, Tensor]] = {}
        self._plans = PlanCache()
        self._warned_stale = False
        self._constructed = False
        super().__init__(params, defaults)
        self._constructed = True
        self.register_state_dict_post_hook(BSAM._add_stream_and_states, prepend=True)
        if self._capturable and tensors:
            # Made now: made inside a graph capture, a counter's zero-fill would be replayed
            # with every step, and the host's position is stale once a graph has replayed.
            self._state.device_skipped = torch.zeros(1, dtype=torch.int64, device=tensors[0].device)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:                             # a refused group leaves the optimizer as it was
            check_group(group, self._backend, self._shard_group, self._constructed)
            starts = [sharded.shard_start(p) for p in group["params"]]
        except Exception:
            self.param_groups.pop()
            raise
        for p, base in zip(group["params"], continued_bases(self._noise_base, group["params"], starts)):
            self._noise_base[p] = base
        if self._capturable:
            for p in group["params"]:
                self._state.offset_tensor(p.device)
        for p in group["params"]:
            if p.requires_grad:
                init_state(self.state[p], p, group["s_init"], self._unstepped)
        self._plans.drop()

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """Name of the backend in use (what "auto" resolved to)."""
        return self._backend.name

    @property
    def rank(self) -> int:
        """This process's rank in the optimizer's process group, or in the FSDP2 mesh's (0
        when not distributed)."""
        return distributed.rank_in(self._shard_group) if self._shard_group is not None else self._rank

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
        the fused backends' steps, which synchronises)."""
        return self._state.skipped_steps

    @property
    def in_step(self) -> bool:
        """True between sample_noise() and the step() that finishes the step."""
        return self._state.in_step

    @property
    def _noise_key(self) -> int:
        seed = self._state.seed
        return seed if self._group is None else stream_seed(seed, self._rank)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _reshard_fsdp_modules(self) -> None:
        sharded.reshard(self._fsdp_modules)

    def _current_plan(self) -> StepPlan:
        return self._plans.current(self.param_groups, self.state, self._noise_base, self._scratch,
                                   self._unstepped, self._backend)

    # ------------------------------------------------------------------ phases
    @_eager
    @torch.no_grad()
    def sample_noise(self, noise: Optional[Sequence[Tensor]] = None) -> None:
        """Phase 1 of a part: put a posterior sample w + xi/sqrt(N*s) into the parameters.

        Starts a step (loading the mean from the parameters), or a further part of an
        m-part step (first banking the previous part's perturbed gradient). ``noise``:
        optional standard-normal draws xi, one tensor per parameter in param-group order;
        by default they come from the optimizer's noise stream, whose counter advances by
        one per call.
        """
        st = self._state
        if st.phase == NOISY:
            raise RuntimeError("sample_noise() called twice: call perturb() after the "
                               "backward() at the noisy point")
        if noise is not None:
            params = self._params()
            noise = dict(zip(map(id, params), check_noise(noise, params)))
        self._reshard_fsdp_modules()         # FSDP2: the next forward gathers the noisy shards
        first_part = st.phase == IDLE
        if not first_part:       # bank the perturbed-gradient sum: the noisy backward gives g_k alone
            try:
                phases.require_gradients(st.active_work)
            except RuntimeError:
                self.cancel_step()
                raise
            st.banked = gradients.take(st.active)
        else:
            self._begin_step()
        try:
            phases.sample(self._backend, st.sampled, self._noise_key, st.offset, noise, first_part,
                          st.offset_tensor if self._capturable else None)
        except BaseException:
            # Buckets sampled before the failure hold noise: a first part's go back to the
            # mean it loaded; a later part is a step in progress (cancelled as a whole).
            if first_part:                    # (phases.sample restored the buckets it had done)
                st.begin()
            else:
                self.cancel_step()
            raise
        st.advance_noise()
        st.phase = NOISY

    def _begin_step(self) -> None:
        """The start of a step (sample_noise's first part, func.step_batched): nothing changes
        before the checks pass; then the step's plan and its work."""
        st = self._state
        update.report_device_skip(st)
        # Hyperparameters written into param_groups since (schedulers, users) are checked
        # here, before the step changes anything (tensor values unread: no host sync).
        for group in self.param_groups:
            check_hyperparameters(group, read_tensors=False)
        self._drop_stale_gradients()
        st.begin()
        # Frozen parameters (requires_grad=False) are not part of the posterior: no
        # noise, no state, left as they are.
        st.plan = self._current_plan()
        st.sampled = [(g, gp.buckets) for g, gp in zip(self.param_groups, st.plan.groups)]

    @_eager
    @torch.no_grad()
    def perturb(self, grad_scaler=None) -> None:
        """Phase 2 of a part: read the gradient g at the noisy point, move the parameters to
        w + rho * g / s, and set ``.grad = None`` (as ``zero_grad()`` does) so that the
        next backward() gives the perturbed gradient alone. Parameters without a gradient
        go back to the mean and sit out the rest of the step.

        ``grad_scaler``: the enabled ``torch.amp.GradScaler`` that scaled this backward.
        """
        st = self._state
        if st.phase != NOISY:
            raise RuntimeError("perturb() must follow sample_noise() and a backward() at "
                               "the noisy point")
        first_part = st.parts == 0
        try:
            inv_scale = update.keep_scaler(st, grad_scaler)
            active, active_work, idle_work = active_work_of(st.plan, st.sampled, self.param_groups, self.state,
                                                            self._noise_base, self._scratch,
                                                            None if first_part else st.active)
            grads = phases.bucket_gradients(active_work, checked=not st.plan.trusts_gradients)
            self._reshard_fsdp_modules()     # FSDP2: the next forward gathers the perturbed shards
            phases.restore(self._backend, idle_work)
            phases.perturb(self._backend, active_work, grads, inv_scale, first_part,
                           lambda device: st.found_flag("noisy", device))
        except Exception:
            self.cancel_step()
            raise
        st.active, st.active_work, st.idle_work = active, active_work, idle_work
        # The noisy gradient is consumed. The perturbed backward() then accumulates h_k
        # into .grad: onto nothing for part 1, onto h_1 + ... + h_(k-1) for part k, so that
        # after the last part .grad holds the sum (and DDP all-reduces the whole sum).
        gradients.hand_back(active, st.banked, first_part)
        st.banked = []
        st.parts += 1
        st.phase = PERTURBED

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, but refused (before anything changes) while ``.grad`` holds
        the perturbed gradients of earlier parts of an m-part step: zeroing would drop
        them. Zero before ``sample_noise()``; ``step_parts`` closures may zero freely."""
        if self._state.phase == PERTURBED:
            gradients.refuse_zeroing(self._state.parts, self._state.active)
        super().zero_grad(set_to_none=set_to_none)
        if not set_to_none:                       # zeroed in place: still nothing of the user's
            self._state.left_grads = gradients.left_in(self.param_groups)

    @_eager
    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon a step in progress: parameters back at the mean, no state changed.

        The noise stream keeps its position (draws already taken stay taken)."""
        if self._state.phase != IDLE:
            phases.restore(self._backend, self._state.sampled)
        self._state.begin()

    # ------------------------------------------------------------------ step
    @_eager
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
            return drivers.finishing_step(self, self._state, closure, noise, self._finish)
        if self._state.phase != IDLE:
            raise RuntimeError("step(closure) called between sample_noise() and perturb()")
        if hasattr(self, "grad_scale") or hasattr(self, "found_inf"):
            update.forget_scaler_step(self)
            raise RuntimeError("GradScaler.step(optimizer, closure) cannot drive a bSAM step (the "
                               "scaler checks the gradients before the closure makes them); use "
                               "the phase API: sample_noise(), backward, perturb(grad_scaler="
                               "scaler), backward, scaler.step(optimizer)")
        return drivers.closure_step(self, closure, noise, self._finish)

    @_eager
    def step_parts(self, closure: Callable[[int], Tensor], m: int,
                   noise: Optional[Sequence[Sequence[Tensor]]] = None):
        """One m-sharpness step: ``closure(k)`` computes part k's loss and calls backward().

        Every part gets its own noise sample and its own perturbation; the update uses the
        mean of the m perturbed gradients and of the m values sqrt(s)*|g_k|. Returns the
        mean of the losses at the perturbed points.
        """
        return drivers.parts_step(self, self._state, closure, m, noise, self._finish)

    # ------------------------------------------------------------------ gradients
    def _drop_stale_gradients(self) -> None:
        """Gradients left from before the step would be added to the noisy gradient: drop
        them (the noisy gradient must be taken at the noisy point alone). Those the last
        step left go silently; others (a backward of the user's: accumulated micro-batches,
        a snippet without zero_grad()) with a warning, once."""
        foreign = gradients.drop_stale(self.param_groups, self._state.left_grads)
        if foreign and not self._warned_stale:
            self._warned_stale = True
            warn_user(gradients.stale_warning(foreign))

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def _finish(self) -> None:
        """Phase 3: update momentum, mean and precision, and put the mean back in place.

        ``.grad`` holds the sum of the m perturbed gradients (DDP: averaged over ranks).
        An error on the way cancels the step (parameters back at the mean) and is raised."""
        st = self._state
        try:
            phases.require_gradients(st.active_work)
            grads = phases.bucket_gradients(st.active_work, checked=not st.plan.trusts_gradients)
            grads = phases.check_finite(self._backend, st.active_work, grads,
                                        lambda device: st.found_flag("perturbed", device))
            if self._unstepped:                 # their state is the trained one from now on
                self._unstepped.difference_update([p for gp in st.plan.groups for p in gp.params])
            update.finish(self._backend, st, grads, self, max_grad_norm=self._max_grad_norm,
                          world_size=self._world_size, ddp_group=self._group, shard_group=self._shard_group,
                          capturable=self._capturable)
            st.left_grads = gradients.left_in(self.param_groups)
        except BaseException:
            self.cancel_step()
            update.forget_scaler_step(self)
            raise
        update.report_device_skip(self._state)

    # ------------------------------------------------------------------ posterior
    @torch.no_grad()
    def posterior_std(self) -> list[Tensor]:
        """Per-parameter posterior standard deviation 1/sqrt(N*s), in param-group order;
        0 for frozen parameters (requires_grad=False): they are not part of the posterior.
        For an FSDP2 parameter, a DTensor laid out like it."""
        return [sharded.as_dtensor_like(std, p) if sharded.is_sharded(p) else std
                for p, std in zip(self._params(), self._local_posterior_std())]

    def _local_posterior_std(self) -> list[Tensor]:
        self._plans.refresh(self.param_groups, self.state, self._unstepped)     # s_init may have changed
        return local_posterior_std(self.param_groups, self.state)

    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        """Context manager: the parameters hold one posterior sample w + xi/sqrt(N*s)
        (xi from ``torch.randn`` with ``generator``), and the mean again on exit, also on
        an exception. Frozen parameters (requires_grad=False) keep their value.

        FSDP2 parameters: every rank must draw the same sample, so a generator is required
        (seeded alike on every rank); xi is drawn for the full tensor (one at a time) and
        each rank keeps its rows."""
        if self.in_step:
            raise RuntimeError("sampled_params() inside an unfinished bSAM step")
        params = self._params()
        means = [mean_of(p, self.state, self._unstepped) if p.requires_grad else None for p in params]
        with sampled(params, self._local_posterior_std(), means, generator, self._reshard_fsdp_modules):
            yield

    def memory_footprint(self) -> dict[str, int]:
        """Bytes of tensors this optimizer holds on this process: ``state`` (momentum,
        precision, fp32 master means: what a checkpoint saves) and ``scratch`` (the mean
        and u buffers of a step, kept between steps). Under FSDP2 these are this rank's
        shards; under DDP every rank holds them all."""
        return memory_footprint(self.state, self._scratch)

    # ------------------------------------------------------------------ copies
    # What a copy keeps besides torch.optim's defaults, state and groups (the plan and the
    # scratch buffers are made again).
    _COPIED = ("_backend", "_capturable", "_max_grad_norm", "_state", "_noise_base", "_unstepped", "_warned_stale",
               "_constructed", "_group", "_rank", "_world_size", "_shard_group", "_fsdp_modules")

    def __getstate__(self) -> dict:
        """copy.deepcopy, pickle and torch.save(optimizer) keep the whole optimizer (the
        noise stream, the skipped steps, ...), not only what torch.optim's keep."""
        if self.in_step:
            raise RuntimeError("cannot copy or pickle a BSAM inside an unfinished step (after "
                               "sample_noise(), before step())")
        if self._group is not None or self._shard_group is not None:
            raise RuntimeError("a distributed BSAM (DDP process group, FSDP2 mesh) cannot be copied or "
                               "pickled: save its state_dict() and load it into a new BSAM")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._COPIED}}

    def __setstate__(self, state: dict) -> None:
        unpickled = "_plans" not in self.__dict__     # (torch's load_state_dict calls this too)
        super().__setstate__(state)
        if unpickled:
            self._scratch, self._plans = {}, PlanCache()
            self.register_state_dict_post_hook(BSAM._add_stream_and_states, prepend=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch.optim's, plus the noise stream's position and the skipped steps (see
        ``checkpoint.py``). The state of an FSDP2 parameter is a DTensor laid out like it
        (sharing the optimizer's storage)."""
        if self._state.phase != IDLE:
            raise RuntimeError("state_dict() inside an unfinished bSAM step (after "
                               "sample_noise(), before step())")
        self._plans.refresh(self.param_groups, self.state, self._unstepped)
        return super().state_dict()

    @staticmethod
    def _add_stream_and_states(optimizer: "BSAM", state_dict: dict) -> dict:
        """The first state_dict post-hook (so that users' hooks see the whole state)."""
        return checkpoint.add_stream_and_states(state_dict, optimizer._params(), optimizer._state.seed,
                                                optimizer.noise_offset, optimizer.skipped_steps,
                                                optimizer._unstepped)

    def load_state_dict(self, state_dict: dict) -> None:
        if self._state.phase != IDLE:
            raise RuntimeError("load_state_dict() inside an unfinished bSAM step")
        state_dict = checkpoint.checked(state_dict, self._params(), self._shard_group)
        saved = checkpoint.saved_states(state_dict)      # (before torch.optim's load rounds them)
        super().load_state_dict(state_dict)
        checkpoint.restore_states(saved, self.param_groups, self.state, self._unstepped)
        self._plans.drop()
        self._state.set_noise(int(state_dict["noise"]["seed"]), int(state_dict["noise"]["offset"]))
        self._state.set_skipped(int(state_dict.get("skipped_steps", 0)))
        self._state.begin()

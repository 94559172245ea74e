"""`BSAM`: Bayesian-SAM as a ``torch.optim.Optimizer``.

The optimizer owns the phases of a bSAM step, the state (momentum, precision and, for
bf16/fp16 parameters, an fp32 master mean), the noise stream, and the choice of backend.
The arithmetic lives in the backends (``reference.py``, ``foreach.py``, ``fused.py``).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._backend import Bucket, opmath_dtype
from .backends import make_backend
from .noise import noise_bases, seed_from_default_generator, stream_seed

_IDLE, _NOISY, _PERTURBED = "idle", "noisy", "perturbed"


def _check_hyperparameters(group: dict) -> None:
    """ValueError naming the first invalid hyperparameter of a param group."""
    lr = group["lr"]
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a float or a one-element tensor, got shape {tuple(lr.shape)}")
    if not lr_value >= 0.0:
        raise ValueError(f"Invalid lr: {lr_value} (must be >= 0)")
    if not group["num_data"] > 0:
        raise ValueError(f"Invalid num_data: {group['num_data']} (must be > 0: the number "
                         "of training examples N)")
    rho = group["rho"]
    if isinstance(rho, Tensor) and rho.numel() != 1:
        raise ValueError(f"rho must be a float or a one-element tensor, got shape {tuple(rho.shape)}")
    if not (rho.item() if isinstance(rho, Tensor) else rho) >= 0.0:
        raise ValueError(f"Invalid rho: {rho} (must be >= 0)")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta{i + 1} (betas[{i}]): {beta} (must be in [0, 1))")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']} (must be >= 0)")
    if not group["damping"] >= 0.0:
        raise ValueError(f"Invalid damping: {group['damping']} (must be >= 0)")
    if not group["s_init"] > 0.0:
        raise ValueError(f"Invalid s_init: {group['s_init']} (must be > 0)")


def _check_parameter(p: Tensor) -> None:
    if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
        raise ValueError("BSAM does not support sharded DTensor parameters (FSDP2 "
                         "fully_shard, tensor parallelism): bSAM keeps per-element state and "
                         "noise indexed over whole tensors. Use DistributedDataParallel with "
                         "BSAM(..., process_group=...) instead (see README).")
    if p.is_complex():
        raise ValueError("BSAM does not support complex parameters (got dtype "
                         f"{p.dtype}); use torch.view_as_real to optimise the real parts")
    if not p.is_floating_point():
        raise ValueError(f"BSAM only optimises floating-point parameters, got dtype {p.dtype}")
    if p.is_sparse:
        raise ValueError("BSAM does not support sparse parameters")


def _inverse(scale: Tensor) -> Tensor:
    """1/scale of a GradScaler's scale, on its device, as float32 (computed in float64)."""
    return scale.double().reciprocal().float()


def _grad_factor(inv_scale: Tensor, m: int, b: Bucket) -> Tensor:
    """inv_scale / m on the bucket's device, in its opmath dtype (float64 for float64
    parameters: every backend reads the factor in the arithmetic's precision)."""
    return inv_scale.to(device=b.device, dtype=torch.float64).div(m).to(b.means[0].dtype)


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
        _check_hyperparameters(defaults)
        self._noise_base: dict[Tensor, int] = {}
        self._noise_end = 0
        super().__init__(params, defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._backend_request = backend
        self._backend = make_backend(backend, all_params)
        if seed is None:
            seed = seed_from_default_generator()
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**64))")
        self._group, self._rank, self._world_size = None, 0, 1
        if process_group is not None:
            seed = self._join_process_group(process_group, seed, all_params)
        self._seed = seed
        self._offset = 0                 # draws taken from the noise stream so far
        self._skipped = 0                # steps skipped for a non-finite gradient (host count)
        if capturable and not self._backend.device_side:
            raise ValueError(f"capturable=True needs a fused backend ('cuda' or 'cpu'), not "
                             f"{self.backend!r}")
        self._capturable = bool(capturable)
        # capturable: the noise counter lives on each parameter device, advanced by
        # kernels, so a CUDA graph of a whole step replays with fresh noise. The counters
        # exist from the start: creating one inside a graph capture would be too late, and
        # after replays the host's _offset no longer knows the position.
        self._device_offset: dict[torch.device, Tensor] = {}
        if self._capturable:
            for p in all_params:
                self._offset_tensor(p.device)
        # Steps skipped on the device (capturable / GradScaler steps): one counter, so that
        # a step is counted once however many devices it spans; made here when capturable
        # (made inside a capture, its zero-fill would be replayed with every step).
        self._device_skipped: Optional[Tensor] = None
        if self._capturable and all_params:
            self._device_skipped = torch.zeros((), dtype=torch.int64, device=all_params[0].device)
        self._phase = _IDLE
        self._scratch: dict[Tensor, dict[str, Tensor]] = {}
        self._reset_step()

    # ------------------------------------------------------------------ setup
    def _join_process_group(self, process_group, seed: int, params: list[Tensor]) -> int:
        """Distributed training (see README): every rank draws from its own noise stream,
        keyed by the shared seed (rank 0's, broadcast here) and the rank."""
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        group = dist.group.WORLD if process_group is True else process_group
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        device = params[0].device if params else torch.device("cpu")
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        shared = torch.tensor([seed - (1 << 64) if seed >= (1 << 63) else seed], dtype=torch.int64,
                              device=device)
        dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
        value = int(shared.item())
        return value + (1 << 64) if value < 0 else value

    @property
    def _noise_key(self) -> int:
        return self._seed if self._group is None else stream_seed(self._seed, self._rank)

    @property
    def rank(self) -> int:
        """This process's rank in the optimizer's process group (0 when not distributed)."""
        return self._rank

    @property
    def backend(self) -> str:
        """Name of the backend in use (what "auto" resolved to)."""
        return self._backend.name

    @property
    def noise_seed(self) -> int:
        return self._seed

    @property
    def noise_offset(self) -> int:
        """Number of noise draws taken so far (the stream's counter)."""
        if self._device_offset:
            return int(next(iter(self._device_offset.values())).item())
        return self._offset

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held inf or NaN (reads the device counters of
        capturable / GradScaler steps, which synchronises)."""
        device_count = 0 if self._device_skipped is None else int(self._device_skipped.item())
        return self._skipped + device_count

    def _offset_tensor(self, device: torch.device) -> Tensor:
        """The device noise counter of `device` (capturable). A new one copies an existing
        device counter (the host's _offset is stale once a graph has replayed steps); the
        first is filled by a kernel, not copied from the host."""
        if device not in self._device_offset:
            if self._device_offset:
                source = next(iter(self._device_offset.values()))
                self._device_offset[device] = source.to(device, copy=True)
            else:
                self._device_offset[device] = torch.full((1,), self._offset, dtype=torch.int64,
                                                         device=device)
        return self._device_offset[device]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        _check_hyperparameters(group)
        for p in group["params"]:
            _check_parameter(p)
        bases = noise_bases([p.numel() for p in group["params"]])
        for p, base in zip(group["params"], bases):
            self._noise_base[p] = self._noise_end + base
        self._noise_end += sum((p.numel() + 3) // 4 * 4 for p in group["params"])
        if hasattr(self, "_backend"):
            for p in group["params"]:
                reason = self._backend.supports(p)
                if reason is not None:
                    raise ValueError(f"backend {self.backend!r} cannot handle a parameter: "
                                     f"{reason}")
        if getattr(self, "_capturable", False):
            for p in group["params"]:
                self._offset_tensor(p.device)

    def _reset_step(self) -> None:
        self._phase = _IDLE
        self._parts = 0
        self._active: list[list[Tensor]] = []
        self._found = {"noisy": {}, "perturbed": {}}
        self._used_scaler = False
        self._scaler_inv_scale: Optional[Tensor] = None   # 1/scale of perturb(grad_scaler=)
        self._banked: list[list[Tensor]] = []

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

    def _found_flag(self, kind: str, device: torch.device) -> Tensor:
        flags = self._found[kind]
        if device not in flags:
            flags[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return flags[device]

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
        if self._phase == _NOISY:
            raise RuntimeError("sample_noise() called twice: call perturb() after the "
                               "backward() at the noisy point")
        all_params = [p for g in self.param_groups for p in g["params"]]
        if noise is not None:
            noise = list(noise)
            if len(noise) != len(all_params):
                raise ValueError(f"noise: expected {len(all_params)} tensors (one per "
                                 f"parameter), got {len(noise)}")
            for i, (xi, p) in enumerate(zip(noise, all_params)):
                if not isinstance(xi, Tensor) or xi.shape != p.shape:
                    raise ValueError(f"noise[{i}]: expected a tensor of shape {tuple(p.shape)}, "
                                     f"got {getattr(xi, 'shape', type(xi).__name__)}")
                if not xi.is_floating_point():
                    raise ValueError(f"noise[{i}]: expected a floating-point tensor, got {xi.dtype}")
                if xi.device != p.device:
                    raise ValueError(f"noise[{i}]: expected device {p.device}, got {xi.device}")
        first_part = self._phase == _IDLE
        if not first_part:
            self._bank_perturbed_gradients()
        else:
            self._reset_step()
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(group, p)
        offset = self._offset
        devices = set()
        index = 0
        for group in self.param_groups:
            params = group["params"]
            group_noise = None if noise is None else dict(zip(params, noise[index:index + len(params)]))
            index += len(params)
            for b in self._buckets(group, params):
                xi = None if group_noise is None else [group_noise[p] for p in b.params]
                counter = self._offset_tensor(b.device) if self._capturable else None
                devices.add(b.device)
                self._backend.sample(b, group["num_data"], self._noise_key, offset, xi,
                                     load_mean=first_part and not b.master_mean,
                                     offset_tensor=counter)
        self._offset += 1
        if self._capturable:
            for device in devices:
                self._offset_tensor(device).add_(1)
        self._phase = _NOISY

    def _grads(self, params: list[Tensor]) -> list[Tensor]:
        grads = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("BSAM does not support sparse gradients; use a dense "
                                   "gradient (e.g. nn.Embedding(sparse=False))")
            if p.grad.is_complex() or p.grad.shape != p.shape:
                raise RuntimeError(f"gradient of shape {tuple(p.grad.shape)} / dtype "
                                   f"{p.grad.dtype} does not match its parameter "
                                   f"{tuple(p.shape)} / {p.dtype}")
            grads.append(p.grad)
        return grads

    @torch.no_grad()
    def perturb(self, grad_scaler=None) -> None:
        """Phase 2 of a part: read the gradient g at the noisy point, move the parameters to
        w + rho * g / s, and set ``.grad = None`` (as ``zero_grad()`` does) so that the
        next backward() gives the perturbed gradient alone. Parameters without a gradient go back to the mean and
        sit out the rest of the step.

        ``grad_scaler``: the enabled ``torch.amp.GradScaler`` that scaled this backward.
        """
        if self._phase != _NOISY:
            raise RuntimeError("perturb() must follow sample_noise() and a backward() at "
                               "the noisy point")
        inv_scale = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            scale = getattr(grad_scaler, "_scale", None)
            if scale is None:
                self.cancel_step()
                raise RuntimeError("perturb(grad_scaler=...): the scaler has not scaled a "
                                   "loss yet (call scaler.scale(loss).backward() first)")
            self._used_scaler = True
            inv_scale = _inverse(scale)
            # Kept for step(): the perturbed gradients carry the same scale, also when the
            # step is finished by opt.step() rather than scaler.step(opt).
            self._scaler_inv_scale = inv_scale
        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        try:
            for params in active:
                self._grads(params)
            if self._parts and [[id(p) for p in a] for a in active] != \
                    [[id(p) for p in a] for a in self._active]:
                raise RuntimeError("perturb(): the set of parameters with gradients changed "
                                   "between the parts of one step")
        except Exception:
            self.cancel_step()
            raise
        first_part = self._parts == 0
        self._active = active
        for group, params in zip(self.param_groups, active):
            idle = [p for p in group["params"] if p.grad is None]
            for b in self._buckets(group, idle):
                self._backend.restore(b)
            for b in self._buckets(group, params):
                scale = None if inv_scale is None else inv_scale.to(b.device)
                self._backend.perturb(b, [p.grad for p in b.params], group["rho"], scale,
                                      first_part, self._found_flag("noisy", b.device))
        # The noisy gradient is consumed. The perturbed backward() then accumulates h_k
        # into .grad: onto nothing for part 1, onto h_1 + ... + h_(k-1) for part k, so that
        # after the last part .grad holds the sum (and DDP all-reduces the whole sum).
        for i, params in enumerate(active):
            for j, p in enumerate(params):
                p.grad = None if first_part else self._banked[i][j]
        self._banked = []
        self._parts += 1
        self._phase = _PERTURBED

    def _bank_perturbed_gradients(self) -> None:
        """Part k > 1 begins: take the perturbed-gradient sum out of ``.grad``, so that the
        coming noisy backward() gives g_k alone; perturb() hands it back afterwards."""
        self._check_perturbed_gradients()
        self._banked = [[p.grad for p in params] for params in self._active]
        for params in self._active:
            for p in params:
                p.grad = None

    def _check_perturbed_gradients(self) -> None:
        for params in self._active:
            missing = [p for p in params if p.grad is None]
            if missing:
                self.cancel_step()
                raise RuntimeError(f"{len(missing)} parameter(s) had a gradient at the noisy "
                                   "point but none at the perturbed point")
            try:
                self._grads(params)
            except Exception:
                self.cancel_step()
                raise

    def _all_reduce_u_and_flags(self, found: dict) -> None:
        """Distributed: sum u over ranks and share the noisy-gradient inf/NaN flags, in one
        flattened all-reduce per device (the perturbed gradients are DDP's to reduce)."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        groups: dict[tuple, list[Tensor]] = defaultdict(list)
        for params in self._active:
            for p in params:
                u = self._scratch[p]["u"]
                groups[(u.device, u.dtype)].append(u)
        for device in {d for d, _ in groups} | set(found):
            groups[(device, torch.float32)].append(self._found_flag("noisy", device))
        for tensors in groups.values():        # one per device, unless fp64 meets fp32
            flat = _flatten_dense_tensors(tensors)
            dist.all_reduce(flat, group=self._group)
            for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                t.copy_(reduced)

    @torch.no_grad()
    def _finish(self) -> None:
        """Phase 3: update momentum, mean and precision, and put the mean back in place.

        ``.grad`` holds the sum of the m perturbed gradients (DDP: averaged over ranks)."""
        m = self._parts
        self._check_perturbed_gradients()
        for params in self._active:
            by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
            for p in params:
                by_device[p.device].append(p.grad)
            for device, grads in by_device.items():
                self._backend.check_finite(grads, self._found_flag("perturbed", device))
        if self._group is not None:
            self._all_reduce_u_and_flags(self._found["noisy"])
        scaler_found = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if self._backend.device_side and (self._capturable or self._used_scaler
                                          or grad_scale is not None or scaler_found is not None):
            self._update_skipping_on_device(m, grad_scale, scaler_found)
            return
        bad_noisy = any(f.item() for f in self._found["noisy"].values())
        bad_perturbed = any(f.item() for f in self._found["perturbed"].values())
        bad_scaler = scaler_found is not None and bool(scaler_found.item())
        if bad_noisy or bad_perturbed or bad_scaler:
            self._restore_all()
            self._skipped += 1
            if not (self._used_scaler or bad_scaler or grad_scale is not None):
                # A non-finite noisy gradient makes the perturbed point, and so the
                # perturbed gradient, non-finite too: name the first one.
                which = "noisy" if bad_noisy else "perturbed"
                warnings.warn(f"BSAM: skipped a step: the {which} gradient holds inf or NaN; "
                              "mean, momentum and precision are unchanged "
                              f"({self.skipped_steps} skipped so far)", RuntimeWarning,
                              stacklevel=3)
            self._reset_step()
            return
        self._apply_update(m, grad_scale)

    def _update_skipping_on_device(self, m: int, grad_scale: Optional[Tensor],
                                   scaler_found: Optional[Tensor]) -> None:
        """The update with no host synchronisation (capturable, GradScaler): the inf/NaN
        flags of every device (and the scaler's) are summed into one flag, so the kernels
        skip the step on all devices or on none, and it is counted once."""
        flags = [f for kind in ("noisy", "perturbed") for f in self._found[kind].values()]
        if scaler_found is not None:
            flags.append(scaler_found)
        home = self._device_skipped.device if self._device_skipped is not None else \
            flags[0].device if flags else None
        total = None
        for flag in flags:
            flag = flag.to(device=home, dtype=torch.float32)
            total = flag if total is None else total + flag
        if total is None:                                  # nothing to check: never skip
            self._apply_update(m, grad_scale)
            return
        if self._device_skipped is None:
            self._device_skipped = torch.zeros((), dtype=torch.int64, device=home)
        self._device_skipped.add_((total > 0).to(torch.int64).sum())
        per_device: dict[torch.device, Tensor] = {home: total}

        def skip_flag(device: torch.device) -> Tensor:
            if device not in per_device:
                per_device[device] = total.to(device)
            return per_device[device]
        self._apply_update(m, grad_scale, skip_flag)

    def _apply_update(self, m: int, grad_scale: Optional[Tensor],
                      skip_flag: Optional[Callable[[torch.device], Tensor]] = None) -> None:
        """Mean back into the parameters without a gradient; the posterior update for the
        rest (skipped on the device where skip_flag(device) is non-zero)."""
        u_factor = 1.0 / (m * self._world_size)      # u_sums were summed over ranks
        # The perturbed gradients' scale: scaler.step(opt) sets grad_scale; a step finished
        # by opt.step() after perturb(grad_scaler=) uses the scale perturb() saw.
        inv_scale = _inverse(grad_scale) if grad_scale is not None else self._scaler_inv_scale
        for group, params in zip(self.param_groups, self._active):
            active_ids = {id(p) for p in params}
            for b in self._buckets(group, [p for p in group["params"] if id(p) not in active_ids]):
                self._backend.restore(b)
            beta1, beta2 = group["betas"]
            for b in self._buckets(group, params):
                factor = 1.0 / m if inv_scale is None else _grad_factor(inv_scale, m, b)
                self._backend.update(b, [p.grad for p in b.params], factor, u_factor, group["lr"],
                                     beta1, beta2, group["weight_decay"], group["damping"],
                                     skip_if=None if skip_flag is None else skip_flag(b.device))
        self._reset_step()

    def _restore_all(self) -> None:
        for group in self.param_groups:
            for b in self._buckets(group, [p for p in group["params"] if p in self.state]):
                self._backend.restore(b)

    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon a step in progress: parameters back at the mean, no state changed.

        The noise stream keeps its position (draws already taken stay taken)."""
        if self._phase != _IDLE:
            self._restore_all()
        self._reset_step()

    @property
    def in_step(self) -> bool:
        """True between sample_noise() and the step() that finishes the step."""
        return self._phase != _IDLE

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
        if closure is None:
            if self._phase != _PERTURBED:
                raise RuntimeError("step() without a closure finishes a step begun with "
                                   "sample_noise() and perturb(); pass a closure instead")
            if noise is not None:
                raise ValueError("noise is given to sample_noise() in the phase API")
            self._finish()
            return None
        if self._phase != _IDLE:
            raise RuntimeError("step(closure) called inside a step begun with sample_noise()")
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

    def _closure_onto_banked(self, closure: Callable[[], Tensor]):
        """Run a closure at the perturbed point and add its gradient to the sum perturb()
        handed back, even if the closure calls zero_grad() first (as closures do)."""
        held = [[p.grad for p in params] for params in self._active]
        for params in self._active:
            for p in params:
                p.grad = None
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            for params, sums in zip(self._active, held):
                for p, total in zip(params, sums):
                    if total is not None and p.grad is not None:
                        p.grad = total.add_(p.grad)
                    elif total is not None:
                        p.grad = total
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
        if self._phase != _IDLE:
            raise RuntimeError("step_parts() called inside a step begun with sample_noise()")
        losses = []
        try:
            for k in range(m):
                self.sample_noise(None if noise is None else noise[k])
                with torch.enable_grad():
                    closure(k)
                self.perturb()
                losses.append(self._closure_onto_banked(lambda: closure(k)))
        except BaseException:
            self.cancel_step()
            raise
        self._finish()
        if all(isinstance(loss, Tensor) for loss in losses):
            return torch.stack([loss.detach() for loss in losses]).mean()
        return None

    # ------------------------------------------------------------------ posterior
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def posterior_std(self) -> list[Tensor]:
        """Per-parameter posterior standard deviation 1/sqrt(N*s), in param-group order."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                s = state.get("precision")
                if s is None:
                    s = torch.full_like(p, group["s_init"], dtype=opmath_dtype(p.dtype))
                out.append(torch.rsqrt(group["num_data"] * s))
        return out

    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        """Context manager: the parameters hold one posterior sample w + xi/sqrt(N*s)
        (xi from ``torch.randn`` with ``generator``), and the mean again on exit, also on
        an exception."""
        if self._phase != _IDLE:
            raise RuntimeError("sampled_params() inside an unfinished bSAM step")
        params = self._params()
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, std in zip(params, self.posterior_std()):
                    xi = torch.randn(p.shape, generator=generator, dtype=std.dtype,
                                     device=generator.device if generator is not None else p.device)
                    p.copy_(self._mean_of(p) + xi.to(p.device) * std)
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)

    def _mean_of(self, p: Tensor) -> Tensor:
        state = self.state.get(p, {})
        return state["mean"] if "mean" in state else p.detach().to(opmath_dtype(p.dtype))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self._phase != _IDLE:
            raise RuntimeError("state_dict() inside an unfinished bSAM step (after "
                               "sample_noise(), before step())")
        sd = super().state_dict()
        sd["noise"] = {"seed": self._seed, "offset": self.noise_offset}
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if self._phase != _IDLE:
            raise RuntimeError("load_state_dict() inside an unfinished bSAM step")
        missing = [k for k in ("state", "param_groups", "noise") if k not in state_dict]
        if missing:
            raise ValueError(f"not a BSAM state_dict: missing {missing}")
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = self._params()
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} parameters, this optimizer "
                             f"{len(params)}")
        for g in state_dict["param_groups"]:
            _check_hyperparameters({**self.defaults, **g})
        # torch.optim casts floating state to the parameter dtype, which would round the
        # fp32 state of bf16/fp16 parameters; load it ourselves after the groups.
        originals = {i: dict(state_dict["state"].get(i, {})) for i in saved_ids}
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            st = originals[i]
            self.state.pop(p, None)
            if st:
                dtype = opmath_dtype(p.dtype)
                self.state[p] = {k: (v.to(device=p.device, dtype=dtype, copy=True)
                                     if isinstance(v, Tensor) else v) for k, v in st.items()}
        for g in self.param_groups:
            g["betas"] = tuple(g["betas"])
        self._seed = int(state_dict["noise"]["seed"])
        self._offset = int(state_dict["noise"]["offset"])
        for counter in self._device_offset.values():
            counter.fill_(self._offset)
        self._skipped = int(state_dict.get("skipped_steps", 0))
        if self._device_skipped is not None:
            self._device_skipped.zero_()
        self._reset_step()

"""The boundary between the optimizer and the code that touches tensors.

`BSAM` (``optimizer.py``) owns the state machine, hyperparameters, state and the noise
stream. A *backend* does the arithmetic of each phase on a :class:`Bucket`: a set of
parameters that share one device and one dtype (and one param group). Every backend
implements the same five methods; the ``reference`` backend (``backends/reference.py``) is the
oracle the others are tested against.

Phases of one step with m parts (``k = 0..m-1``)::

    sample     p = w + xi_k / sqrt(N * s)            (k = 0 first loads w from p)
    perturb    u += sqrt(s) * |g_k| ;  p = w + rho * g_k / s
    update     gm = b1*gm + (1-b1)*(g + wd*w) ;  w -= lr*gm/s ;
               s = b2*s + (1-b2)*(u + damping + wd) ;  p = w
    restore    p = w                                   (cancelled or skipped step)

Here ``g = grad_factor * grad`` and ``u = u_factor * usum``, where the factors fold in
``1/m`` (and ``1/world_size``) and a GradScaler's ``1/scale``; with m parts ``grad`` is the
sum of the m perturbed gradients, accumulated by autograd (see ``gradients.py``).
``found_inf`` (a one-element float32 tensor on the bucket's device) is set to 1 when a
gradient holds inf or NaN. Backends never write gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the optimizer state (and of the arithmetic) for a parameter dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class Bucket:
    """Parameters of one param group that share a device and a dtype, with their state."""
    params: list[Tensor]
    means: list[Tensor]        # w, opmath dtype: fp32 master copy (low precision) or scratch
    momenta: list[Tensor]      # gm
    precisions: list[Tensor]   # s
    u_sums: list[Tensor]       # sum_k sqrt(s)*|g_k|, scratch
    bases: list[int]           # start of each tensor in the noise stream
    master_mean: bool          # True: means persist across steps (bf16/fp16 params)
    owners: list[Tensor]       # the optimizer's parameter of each (the DTensor of a shard):
                               # whose .grad is its gradient
    aligned: bool = True       # every base a multiple of 4 (see FusedBackend.sample)
    # A step plan's bucket: the key under which a backend may keep what it derives from
    # these lists (the CUDA kernels' packed pointer tables) until the plan is made again.
    # None for the buckets of a single step (parameters without a gradient split off).
    table_key: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device


class Backend:
    """Interface of a backend; see the module docstring for what each phase computes."""

    name: str = "?"
    priority = 0          # "auto" tries the available backends by descending priority
    # True if every phase checks its tensors (device, dtype, shape, layout) before it
    # touches memory, so gradients may be handed over unchecked: the step checks them in
    # Python only when a phase refuses them (see phases.py).
    checks_inputs = False
    # True if sample() takes the noise counter from a device tensor and update() can skip
    # a step on a device-side flag: what capturable=True and GradScaler steps need to run
    # without host synchronisation.
    device_side = False

    @staticmethod
    def is_available() -> bool:
        return True

    def supports(self, param: Tensor) -> Optional[str]:
        """None if this backend can handle the parameter, else the reason it cannot."""
        return None

    def sample(self, b: Bucket, num_data: float, seed: int, offset: int,
               noise: Optional[Sequence[Tensor]], load_mean: bool,
               offset_tensor: Optional[Tensor] = None) -> None:
        raise NotImplementedError

    def perturb(self, b: Bucket, grads: list[Tensor], rho: float,
                inv_scale: Optional[Tensor], first_part: bool, found_inf: Tensor) -> None:
        raise NotImplementedError

    def check_finite(self, grads: list[Tensor], found_inf: Tensor, like: Optional[list[Tensor]] = None) -> None:
        """found_inf := 1 if a gradient holds inf or NaN; `like`: the parameters the
        gradients must match (checked by backends that check their inputs)."""
        mark_non_finite(grads, found_inf)

    def update(self, b: Bucket, grads: list[Tensor], grad_factor: Scalar, u_factor: float,
               lr: Scalar, beta1: float, beta2: float, weight_decay: float,
               damping: float, skip_if: Optional[Tensor] = None) -> None:
        """skip_if (device_side backends only): skip on the device when it is non-zero."""
        self.prepare_update(b, grads, grad_factor, u_factor, lr, beta1, beta2, weight_decay, damping,
                            skip_if)()

    def prepare_update(self, b: Bucket, grads: list[Tensor], grad_factor: Scalar, u_factor: float,
                       lr: Scalar, beta1: float, beta2: float, weight_decay: float,
                       damping: float, skip_if: Optional[Tensor] = None) -> Callable[[], None]:
        """The update in two halves: compute now, write when the returned commit is
        called. The optimizer prepares every bucket before it commits any, so that an
        error (out of memory, say) leaves every bucket as it was; the price is one set of
        new values (gm, w, s) per bucket held until the commits. Backends that compute and
        write in one kernel (fused) return the kernel call: the optimizer checks their
        inputs before the first commit, but a kernel that failed anyway after an earlier
        bucket's ran would leave that bucket updated."""
        raise NotImplementedError

    def restore(self, b: Bucket) -> None:
        torch._foreach_copy_(b.params, b.means)


def mark_non_finite(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """found_inf := 1 if any tensor holds inf or NaN (no host synchronisation)."""
    if tensors:
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
        found_inf.copy_(torch.maximum(found_inf, bad.to(found_inf.dtype)))

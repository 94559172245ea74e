"""The state of bSAM's step machine and counters, as one object.

A step runs through phases::

    idle --sample_noise()--> noisy --perturb()--> perturbed --step()--> idle
                               ^                      |
                               +--- sample_noise() ---+   (the next of m parts)

``StepState`` holds everything that changes as steps are taken and is not tensor state of
a parameter: the phase, the parts taken, the step's work (its plan's buckets, and those of
the parameters active in it), their banked perturbed gradients, the inf/NaN flags, the
GradScaler seen, the noise stream's key and position (with its device counters under
``capturable=True``) and the skipped-step counts, with the report of a step skipped on the
device, read when it is ready (``poll_device_skip``) so that the device never waits.

It is one object, changed in place and never replaced, so that a copy of the optimizer's
``__dict__`` (as Lightning's ``LightningOptimizer`` makes) shares it with the optimizer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

IDLE, NOISY, PERTURBED = "idle", "noisy", "perturbed"


class StepState:
    def __init__(self, seed: int):
        self.seed = seed                  # key of the noise stream
        self.offset = 0                   # draws taken so far (host copy)
        # capturable: the noise counter of each parameter device, read and advanced by the
        # kernels, so that a captured CUDA graph of a whole step draws fresh noise.
        self.device_offset: dict[torch.device, Tensor] = {}
        self.skipped = 0                  # steps skipped on the host path
        # steps skipped on the device (capturable / GradScaler): one counter, so that a
        # step is counted once however many devices it spans.
        self.device_skipped: Optional[Tensor] = None
        # (event or None, host tensor [noisy flag, perturbed flag, device count]) of the
        # last step that skipped on the device, until it is read.
        self.pending_skip: Optional[tuple] = None
        self.reported_device_skips = 0    # the device count the last report had
        self.left_grads: dict = {}        # the gradients the last step left (gradients.left_by_step)
        self.begin()

    def __getstate__(self) -> dict:
        """For copies of an idle optimizer: an unread skip report (a CUDA event) stays behind."""
        return {**self.__dict__, "pending_skip": None}

    def begin(self) -> None:
        """Forget the step in progress (if any): back to idle."""
        self.phase = IDLE
        self.parts = 0                                  # parts perturbed so far
        self.plan = None                                # the step plan of this step
        self.sampled: list = []                         # (group, buckets): params in the posterior
        self.active: list[list[Tensor]] = []            # per group: params with a gradient
        self.active_work: list = []                     # (group, buckets) of those
        self.idle_work: list = []                       # (group, buckets): sampled, no gradient
        self.found: dict[str, dict[torch.device, Tensor]] = {"noisy": {}, "perturbed": {}}
        self.scaler = None                              # the GradScaler given to perturb()
        self.scaler_inv_scale: Optional[Tensor] = None  # its 1/scale then
        self.banked: list[list[Optional[Tensor]]] = []  # perturbed-gradient sums between parts

    @property
    def used_scaler(self) -> bool:
        return self.scaler is not None

    @property
    def in_step(self) -> bool:
        return self.phase != IDLE

    def all_found_flags(self) -> list[Tensor]:
        """Every inf/NaN flag of the step, noisy then perturbed, device by device."""
        return [f for kind in ("noisy", "perturbed") for f in self.found[kind].values()]

    def found_flag(self, kind: str, device: torch.device) -> Tensor:
        """The float32 inf/NaN flag of `kind` ("noisy", "perturbed") on `device`."""
        flags = self.found[kind]
        if device not in flags:
            flags[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return flags[device]

    # ------------------------------------------------------------------ noise position
    def offset_tensor(self, device: torch.device) -> Tensor:
        """The device noise counter of `device` (capturable). A new one copies an existing
        device counter (the host's offset is stale once a graph has replayed steps); the
        first is filled by a kernel, not copied from the host."""
        if device not in self.device_offset:
            if self.device_offset:
                source = next(iter(self.device_offset.values()))
                self.device_offset[device] = source.to(device, copy=True)
            else:
                self.device_offset[device] = torch.full((1,), self.offset, dtype=torch.int64, device=device)
        return self.device_offset[device]

    def advance_noise(self) -> None:
        """One draw taken: the host position and every device counter move on."""
        self.offset += 1
        for counter in self.device_offset.values():
            counter.add_(1)

    @property
    def noise_offset(self) -> int:
        if self.device_offset:
            return int(next(iter(self.device_offset.values())).item())
        return self.offset

    def set_noise(self, seed: int, offset: int) -> None:
        self.seed, self.offset = seed, offset
        for counter in self.device_offset.values():
            counter.fill_(offset)

    # ------------------------------------------------------------------ skipped steps
    @property
    def skipped_steps(self) -> int:
        device_count = 0 if self.device_skipped is None else int(self.device_skipped.item())
        return self.skipped + device_count

    def count_device_skip(self, flag: Tensor) -> None:
        """Adds 1 on the device where `flag` > 0, without a host synchronisation."""
        if self.device_skipped is None:
            self.device_skipped = torch.zeros(1, dtype=torch.int64, device=flag.device)
        self.device_skipped.add_(flag.to(self.device_skipped.device) > 0)

    def watch_device_skip(self, noisy: Tensor, perturbed: Tensor) -> None:
        """Keep the flags of a step that may have skipped on the device, to be read once
        they are ready: at once on the CPU, after an event on CUDA (copied asynchronously)."""
        counter = self.device_skipped
        if noisy.device.type != "cuda":
            self.pending_skip = (None, (noisy, perturbed, counter))
            return
        values = torch.stack([noisy.reshape(()), perturbed.reshape(()),
                              counter.to(device=noisy.device, dtype=torch.float32).reshape(())])
        host = values.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(values.device))
        self.pending_skip = (event, host)

    def poll_device_skip(self) -> Optional[tuple[str, int, int]]:
        """(which gradient, steps skipped so far, steps skipped since the last report) if
        the device skipped steps not reported yet and the newest report is ready, else
        None; without waiting for the device."""
        if self.pending_skip is None:
            return None
        event, values = self.pending_skip
        if event is not None and not event.query():
            return None
        self.pending_skip = None
        noisy, perturbed, count = values.tolist() if event is not None else (t.item() for t in values)
        new = int(count) - self.reported_device_skips   # a newer report covers older unread ones
        if new <= 0:
            return None
        self.reported_device_skips = int(count)
        which = "noisy" if noisy else "perturbed" if perturbed else "noisy or perturbed"
        return which, self.skipped + int(count), new

    def set_skipped(self, count: int) -> None:
        self.skipped = count
        self.pending_skip, self.reported_device_skips = None, 0
        if self.device_skipped is not None:
            self.device_skipped.zero_()

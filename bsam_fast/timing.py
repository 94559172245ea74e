"""How the benchmarks time things: wall time around synchronised regions, medians of
repetitions, the device's copy bandwidth, the device's name."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional

import torch

from . import _ops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 3,
              setup: Optional[Callable[[], None]] = None) -> float:
    """Median wall time of fn() in ms; setup() (untimed) runs before every call."""
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbps(device: torch.device, numel: int = 1 << 26, reps: int = 20) -> float:
    """Device copy bandwidth: bytes read + written by a large fp32 copy_, per second."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kernels = _ops.cpu_kernels()
    return f"{model}, {torch.get_num_threads()} threads" + (f", {kernels} kernels" if kernels else "")

"""End-to-end rows of the bench: one training step of a real model (forward, backward and
the optimizer) for Adam, SAM-Adam and bSAM, with m = 1 and m = 8 parts, on a synthetic
batch."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .func import step_batched
from .optimizer import BSAM
from .parts import split_batch
from .timing import device_name, median_ms


def training_step(model_name: str, method: str, backend: Optional[str], device: torch.device,
                  batch: int = 64) -> Callable[[], None]:
    """One training step on a synthetic batch: method "adam", "sam_adam", "bsam" (with the
    given backend), "sam_adam_m8" (SAM's 8 parts, each with its own ascent), or "bsam_m8"
    / "bsam_m8_batched" (8 parts: step_parts, step_batched). Returns the step as a callable
    (the model it trains as its ``model``)."""
    import torch.nn.functional as F

    from .experiments.baselines import SAM
    from .experiments.models import INPUT_SHAPES, make_model
    x = torch.randn(batch, *INPUT_SHAPES[model_name], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    torch.manual_seed(0)
    model = make_model(model_name).to(device)
    if method == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif method in ("sam_adam", "sam_adam_m8"):
        opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-3)
    elif method.startswith("bsam"):
        opt = BSAM(model.parameters(), lr=1e-3, num_data=50_000, backend=backend, seed=0)
    else:
        raise ValueError(f"unknown method {method!r}")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    parts = split_batch(x, y, m=8)

    def part(k):
        opt.zero_grad()
        loss = F.cross_entropy(model(parts[k][0]), parts[k][1])
        loss.backward()
        return loss

    def step():
        if method == "adam":
            closure()
            opt.step()
        elif method in ("bsam_m8", "sam_adam_m8"):
            opt.step_parts(part, 8)
        elif method == "bsam_m8_batched":
            step_batched(opt, model, F.cross_entropy, x, y, 8)
        else:
            opt.step(closure)
    step.model = model
    return step


def run_end_to_end(device: torch.device, models, backends, reps: int, batch: int = 64,
                   progress: bool = True) -> list[dict]:
    """Time of one training step (synthetic batch) for Adam, SAM-Adam and bSAM per backend,
    and with m = 8 parts SAM-Adam and bSAM (sequential and batched) on the first backend.
    Each row's ratios: to Adam, to SAM-Adam with m = 1, and to SAM-Adam with the row's m."""
    results = []
    for name in models:
        rows = {}
        methods = [("adam", None), ("sam_adam", None)] + [("bsam", b) for b in backends]
        methods += [("sam_adam_m8", None), ("bsam_m8", backends[0]), ("bsam_m8_batched", backends[0])]
        for method, backend in methods:
            label = method if backend is None else f"{method}[{backend}]"
            rows[label] = median_ms(training_step(name, method, backend, device, batch), device, reps)
        for label, ms in rows.items():
            same_m = rows["sam_adam_m8" if "_m8" in label else "sam_adam"]
            results.append({"model": name, "method": label, "device": device.type,
                            "device_name": device_name(device), "batch": batch, "median_ms": ms,
                            "overhead_vs_adam": ms / rows["adam"], "overhead_vs_sam_adam": ms / rows["sam_adam"],
                            "overhead_vs_sam_adam_same_m": ms / same_m})
    return results


def format_end_to_end(results: list[dict]) -> str:
    lines = [f"{'model':<14}{'method':<22}{'ms/step':>10}{'x Adam':>8}{'x SAM-Adam':>12}{'x SAM-Adam same m':>19}"]
    for r in results:
        lines.append(f"{r['model']:<14}{r['method']:<22}{r['median_ms']:>10.2f}{r['overhead_vs_adam']:>8.2f}"
                     f"{r['overhead_vs_sam_adam']:>12.2f}{r['overhead_vs_sam_adam_same_m']:>19.2f}")
    return "\n".join(lines)

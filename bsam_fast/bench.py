"""Benchmarks of the bSAM optimizer work, against torch's fused and foreach AdamW.

    python -m bsam_fast.bench [--device cpu|cuda] [--sizes 1e6 1e7] [--layouts one resnet20 ...]
                              [--dtype float32] [--backends ... [compiled]] [--json PATH]
                              [--plot PATH] [--quick] [--end-to-end]

``--backends compiled`` adds the peer a user would write instead: the same update in plain
PyTorch with torch.randn noise, compiled by torch.compile (``compiled_peer.py``); its row
uses the same bytes model (its sample phase reads the mean instead of the parameter).

What is timed: the optimizer's own work for one step, no forward/backward. For bSAM that
is its three phases (sample_noise, perturb, step), each timed on its own with fresh
gradients put in place (untimed) before perturb and step; for AdamW one ``step()``.
Method: warm-up, then the median of ``--reps`` (>= 20) repetitions, with
``torch.cuda.synchronize()`` around each timed region on CUDA.

Bytes model (per element; P = parameter bytes, S = optimizer-state bytes, i.e. fp32 for
bf16/fp16 parameters; m = 1; each input read once, each output written once):

    sample   read p, s           write w (scratch mean), p          2P + 2S
             (bf16/fp16: read the fp32 master w and s, write p:      P + 2S)
    perturb  read g, w, s        write u, p                          2P + 3S
    check    read g (the perturbed gradient, for inf/NaN)            P
    update   read w, gm, s, g, u write gm, s, p (+ w for masters)    2P + 6S (+S)
    AdamW    read p, g, m, v     write p, m, v                       3P + 4S

so an fp32 bSAM step moves 72 bytes per parameter and an fp32 AdamW step 28. The copy
bandwidth is that of one large ``copy_`` (bytes read + written) in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import BSAM, available_backends
from .bench_e2e import format_end_to_end, run_end_to_end
from .timing import copy_bandwidth_gbps, device_name, median_ms, sync

LAYOUTS = ("one", "resnet20", "transformer", "tiny", "host")
# The `host` layout measures the per-step host overhead: many tensors of 16 elements (the
# lists of real models: ResNet-20 has 86 tensors, a transformer hundreds), whatever --sizes.
HOST_TENSORS = (400, 86)
HOST_ELEMENTS = 16


# ------------------------------------------------------------------ parameter layouts
def _resnet20_shapes(width: int) -> list[tuple[int, ...]]:
    from .experiments.models import ResNet20FRN
    return [tuple(p.shape) for p in ResNet20FRN(width=width).parameters()]


def _transformer_shapes(d: int, layers: int = 12) -> list[tuple[int, ...]]:
    shapes = []
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


def layout_shapes(layout: str, numel: int) -> list[tuple[int, ...]]:
    """Shapes of a parameter list of about `numel` elements in the given layout."""
    numel = int(numel)
    if layout == "one":
        return [(numel,)]
    if layout == "resnet20":      # ResNet-20-FRN (0.27M at width 1), widened to the size
        width = max(1, round(math.sqrt(numel / 273_258)))
        return _resnet20_shapes(width)
    if layout == "transformer":   # 12 pre-LN blocks (12 d^2 + 13 d parameters each)
        d = max(8, int(math.sqrt(numel / 144)) // 8 * 8)
        return _transformer_shapes(d)
    if layout == "tiny":          # 400 tiny tensors of odd sizes
        each = max(1, numel // 400)
        return [(each + i % 3,) for i in range(400)]
    if layout == "host":          # numel // 16 tensors of 16 elements
        return [(HOST_ELEMENTS,)] * max(1, numel // HOST_ELEMENTS)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def bsam_bytes(numel: int, param_bytes: int, state_bytes: int) -> dict[str, int]:
    P, S = param_bytes, state_bytes
    master = P != S
    return {"sample": numel * ((P + 2 * S) if master else (2 * P + 2 * S)),
            "perturb": numel * (2 * P + 3 * S),
            "check": numel * P,
            "update": numel * (2 * P + 6 * S + (S if master else 0))}


def adamw_bytes(numel: int, param_bytes: int, state_bytes: int) -> int:
    return numel * (3 * param_bytes + 4 * state_bytes)


@dataclass
class Record:
    backend: str
    device: str
    device_name: str
    dtype: str
    layout: str
    numel: int
    ntensors: int
    median_ms: float
    gbps: float
    pct_copy_bw: float
    ratio_vs_adamw_fused: Optional[float]
    ratio_vs_reference: Optional[float]
    state_bytes: int
    phases_ms: dict = field(default_factory=dict)
    bytes_moved: int = 0


def _make_params(shapes, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) * 1e-2 for s in shapes]
    return params, grads


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer memory: state, and for bSAM its per-step scratch buffers too."""
    if isinstance(opt, BSAM):
        return sum(opt.memory_footprint().values())
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def time_bsam(shapes, device, dtype, backend, reps, alongside: Optional[Callable[[], None]] = None
              ) -> tuple[dict, int, int]:
    """Median ms of each phase, state bytes, backend name. alongside (untimed by default):
    a step of another optimizer timed in the same loop, before each bSAM step, whose
    median is returned as phases["alongside"]: a ratio of the two that drifts of the
    machine's speed between separate runs do not move (the host layout's rows)."""
    params, grads = _make_params(shapes, device, dtype)
    opt = BSAM(params, lr=1e-3, num_data=50_000, rho=0.05, weight_decay=1e-4, backend=backend, seed=0)

    def put_grads():
        for p, g in zip(params, grads):
            p.grad = g

    # One untimed step allocates the state and the scratch buffers.
    opt.sample_noise(); put_grads(); opt.perturb(); put_grads(); opt.step()
    phase_times = {k: [] for k in ("sample", "perturb", "update") + (("alongside",) if alongside else ())}
    for i in range(3 + reps):
        if alongside is not None:
            sync(device); t = time.perf_counter(); alongside(); sync(device)
            if i >= 3:
                phase_times["alongside"].append(time.perf_counter() - t)
        opt.zero_grad()                 # as a training loop does between steps (untimed)
        sync(device); t0 = time.perf_counter(); opt.sample_noise(); sync(device); t1 = time.perf_counter()
        put_grads()
        sync(device); t2 = time.perf_counter(); opt.perturb(); sync(device); t3 = time.perf_counter()
        put_grads()
        sync(device); t4 = time.perf_counter(); opt.step(); sync(device); t5 = time.perf_counter()
        if i >= 3:
            phase_times["sample"].append(t1 - t0)
            phase_times["perturb"].append(t3 - t2)
            phase_times["update"].append(t5 - t4)
    return {k: statistics.median(v) * 1e3 for k, v in phase_times.items()}, _state_bytes(opt), opt.backend


def time_compiled_peer(shapes, device, dtype, reps) -> tuple[dict, int]:
    """The torch.compile peer (``compiled_peer.py``), timed phase by phase as time_bsam
    times BSAM; the state in the parameters' dtype (fp32 and fp64 parameters only)."""
    from . import compiled_peer
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the compiled peer is benchmarked for float32/float64, not {dtype}")
    params, grads = _make_params(shapes, device, dtype)
    with torch.no_grad():
        means = [p.detach().clone() for p in params]
        momenta = [torch.zeros_like(p) for p in params]
        precisions = [torch.ones_like(p) for p in params]
        u_sums = [torch.zeros_like(p) for p in params]
    sample, perturb, update = compiled_peer.compiled_phases()
    phases = {
        "sample": lambda: sample(params, means, precisions, 50_000.0),
        "perturb": lambda: perturb(params, means, precisions, u_sums, grads, 0.05),
        "update": lambda: update(params, means, momenta, precisions, u_sums, grads, 1e-3, 0.9, 0.999,
                                 1e-4, 0.1),
    }
    with torch.no_grad():
        for fn in phases.values():          # compile (untimed)
            fn()
        times = {name: median_ms(fn, device, reps) for name, fn in phases.items()}
    state = sum(t.numel() * t.element_size() for ts in (means, momenta, precisions, u_sums) for t in ts)
    return times, state


def adamw(shapes, device, dtype, impl) -> torch.optim.AdamW:
    """An AdamW (fused or foreach) over such parameters with gradients, stepped once."""
    params, grads = _make_params(shapes, device, dtype)
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, **{impl: True})
    opt.step()
    return opt


def run_ops(device: torch.device, sizes, layouts, dtype: torch.dtype, backends, reps: int,
            progress: bool = True) -> list[Record]:
    copy_bw = copy_bandwidth_gbps(device)
    name = device_name(device)
    P = torch.empty((), dtype=dtype).element_size()
    S = 4 if dtype in (torch.float16, torch.bfloat16) else P
    cases = [(layout, size) for layout in layouts
             for size in ([n * HOST_ELEMENTS for n in HOST_TENSORS] if layout == "host" else sizes)]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases) * (len(backends) + 2), disable=not progress, desc="bench")
    except ImportError:  # tqdm is optional
        bar = None
    records = []
    for layout, size in cases:
        shapes = layout_shapes(layout, size)
        numel = sum(math.prod(s) for s in shapes)
        rows = {}
        for impl in ("fused", "foreach"):
            opt = adamw(shapes, device, dtype, impl)
            ms, state = median_ms(opt.step, device, reps), _state_bytes(opt)
            rows[f"adamw_{impl}"] = (ms, {}, state, adamw_bytes(numel, P, S))
            if bar: bar.update()
        for backend in backends:
            if backend == "compiled":
                phases, state = time_compiled_peer(shapes, device, dtype, reps)
            elif layout == "host":      # AdamW(fused) timed in the same loop: a steady ratio
                peer = adamw(shapes, device, dtype, "fused")
                phases, state, _ = time_bsam(shapes, device, dtype, backend, reps, alongside=peer.step)
                phases["adamw_fused_same_loop"] = phases.pop("alongside")
            else:
                phases, state, _ = time_bsam(shapes, device, dtype, backend, reps)
            bsam_ms = sum(v for k, v in phases.items() if k in ("sample", "perturb", "update"))
            rows[backend] = (bsam_ms, phases, state, sum(bsam_bytes(numel, P, S).values()))
            if bar: bar.update()
        fused_ms = rows["adamw_fused"][0]
        ref_ms = rows["reference"][0] if "reference" in rows else None
        for backend, (ms, phases, state, nbytes) in rows.items():
            gbps = nbytes / ms / 1e6
            if "adamw_fused_same_loop" in phases:
                phases["ratio_vs_adamw_fused_same_loop"] = ms / phases["adamw_fused_same_loop"]
            records.append(Record(backend=backend, device=device.type, device_name=name,
                                  dtype=str(dtype).replace("torch.", ""), layout=layout, numel=numel,
                                  ntensors=len(shapes), median_ms=ms, gbps=gbps,
                                  pct_copy_bw=100 * gbps / copy_bw,
                                  ratio_vs_adamw_fused=ms / fused_ms,
                                  ratio_vs_reference=(ms / ref_ms) if ref_ms else None,
                                  state_bytes=state, phases_ms=phases, bytes_moved=nbytes))
    if bar:
        bar.close()
    for r in records:
        r.phases_ms["copy_bw_gbps"] = copy_bw
    return records


def format_table(records: list[Record]) -> str:
    lines = [f"{'layout':<12}{'numel':>11}{'tensors':>8}  {'backend':<14}{'ms/step':>10}{'GB/s':>8}"
             f"{'%copy':>7}{'t/t_AdamWfused':>15}{'t/t_reference':>14}{'state MB':>10}"]
    for r in records:
        ref = f"{r.ratio_vs_reference:.3f}" if r.ratio_vs_reference is not None else "-"
        lines.append(f"{r.layout:<12}{r.numel:>11}{r.ntensors:>8}  {r.backend:<14}{r.median_ms:>10.2f}"
                     f"{r.gbps:>8.1f}{r.pct_copy_bw:>7.0f}{r.ratio_vs_adamw_fused:>15.2f}{ref:>14}"
                     f"{r.state_bytes / 2**20:>10.1f}")
    host = [r for r in records if "adamw_fused_same_loop" in r.phases_ms]
    if host:
        lines += ["", "host overhead: each phase and the whole step against AdamW(fused=True) timed in the same loop"]
        for r in host:
            a = r.phases_ms["adamw_fused_same_loop"]
            ratios = "  ".join(f"{k} {r.phases_ms[k] / a:.2f}x" for k in ("sample", "perturb", "update"))
            lines.append(f"{r.ntensors:>5} tensors x {r.numel // r.ntensors}  {r.backend:<9} AdamW(fused) {a:.3f} ms;"
                         f"  {ratios};  step {r.median_ms / a:.2f}x")
    return "\n".join(lines)


def plot(records: list[Record], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))  # GB/s against parameters, a line per backend and layout
    for layout in sorted({r.layout for r in records}):
        for backend in sorted({r.backend for r in records}):
            pts = sorted((r.numel, r.gbps) for r in records if r.backend == backend and r.layout == layout)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{backend} ({layout})")
    copy_bw = records[0].phases_ms.get("copy_bw_gbps")
    if copy_bw:
        ax.axhline(copy_bw, color="k", linestyle="--", label=f"copy bandwidth {copy_bw:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("effective GB/s (bytes model)")
    ax.set_title(f"optimizer step, {records[0].device_name}, {records[0].dtype}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bsam_fast.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="+", type=float, default=None, help="parameters per layout (the host "
                    "layout: 400 and 86 tensors of 16, always)")
    ap.add_argument("--layouts", nargs="+", default=None, choices=LAYOUTS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--backends", nargs="+", default=None, help="bSAM backends (default: all available); "
                    "'compiled': the torch.compile peer (compiled_peer.py), a row of its own")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="write the records as a JSON list")
    ap.add_argument("--plot", help="write a PNG of GB/s against parameters")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--end-to-end", action="store_true", help="also time training steps of real models")
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5", "resnet20_frn", "transformer_stack"])
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.reps < 20:
        ap.error("--reps must be at least 20 (the median of 20 repetitions is the method)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    backends = args.backends or [b for b in available_backends()
                                 if b not in ("cpu", "cuda") or b == device.type]
    sizes = args.sizes or ([1e5] if args.quick else [1e6, 1e7])
    layouts = args.layouts or (["one", "resnet20"] if args.quick else list(LAYOUTS))
    records = run_ops(device, sizes, layouts, dtype, backends, args.reps, progress=not args.no_progress)
    print(f"\ndevice: {records[0].device_name}; torch {torch.__version__}; copy bandwidth "
          f"{records[0].phases_ms['copy_bw_gbps']:.1f} GB/s; median of {args.reps} reps")
    print(format_table(records))
    out = {"ops": [asdict(r) for r in records]}
    if args.end_to_end:
        out["end_to_end"] = run_end_to_end(device, args.models, backends, args.reps, progress=not args.no_progress)
        print("\n" + format_end_to_end(out["end_to_end"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out if args.end_to_end else out["ops"], f, indent=1)
    if args.plot:
        plot(records, args.plot)
    return out


if __name__ == "__main__":
    main()

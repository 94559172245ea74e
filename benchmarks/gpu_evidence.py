"""Evidence that the CUDA kernels compute what the CPU kernels compute, one JSON line per
section (run by benchmarks/gpu_check.sh, one process per section, so that a sticky CUDA
error in one cannot hide the others).

    python benchmarks/gpu_evidence.py --section noise|ops|graph [--device cuda|cpu] [--draws N]

Sections:
  noise  the stream's normals from the GPU kernel, the CPU kernel and ``noise.normal_like``
         (the definition, on the CPU) for 3 (seed, offset) pairs, incl. seed 2**64 - 1 and
         an offset > 2**32: mismatch counts and the largest difference in ulp.
  ops    every op on the GPU against the same op on the CPU kernels, for fp32/fp64/bf16/fp16,
         over odd lengths, a storage-offset view, an empty tensor and > 420 tensors, with
         tensor lr/rho, skip_if and an inf in a tail: mismatching elements and the largest
         absolute difference per op and dtype (0 expected: the same operations in the same
         order, one rounding each).
  graph  a whole capturable step captured in a CUDA graph, 20 replays against eager steps,
         then both timed (ms per training step, graph_speedup); the noise counter
         advancing; no host synchronisation (``set_sync_debug_mode("error")``) in a default
         step, a capturable step, a GradScaler step and both; an AMP overflow step
         changing nothing.

``--device cpu`` (the dry run of gpu_check.sh) runs the same code with the CPU kernels on
both sides, to test this script without a GPU; "graph" then reports that it did not run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, _ops
from bsam_fast.noise import noise_bases, normal_like
from bsam_fast.timing import median_ms

SEED_OFFSETS = [(0xDEADBEEF, 12345), (2 ** 64 - 1, 2 ** 32 + 7), (0, 0)]


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in units in the last place of float32 (ordered integer representation)."""
    def ordered(x):
        i = x.astype(np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, np.int64(-2 ** 31) - i, i)
    return np.abs(ordered(a) - ordered(b))


# ------------------------------------------------------------------------ noise
def section_noise(device: str, draws: int) -> dict:
    big = max(draws - 50_000, 1)
    shapes = [(big,), (1,), (2,), (3,), (5,), (4099,)] + [(7,)] * 330 + [(0,)]
    bases = noise_bases([int(np.prod(s)) for s in shapes])
    total = sum(int(np.prod(s)) for s in shapes)
    pairs = []
    for seed, offset in SEED_OFFSETS:
        empty = [torch.empty(s) for s in shapes]
        defined = torch.cat([t.reshape(-1) for t in normal_like(empty, bases, seed, offset)]).numpy()
        cpu = torch.cat([t.reshape(-1) for t in _ops.normal(empty, bases, seed, offset)]).numpy()
        dev = torch.cat([t.reshape(-1) for t in _ops.normal([torch.empty(s, device=device) for s in shapes],
                                                             bases, seed, offset)]).cpu().numpy()
        pairs.append({"seed": seed, "offset": offset, "draws": total,
                      "gpu_vs_cpu_kernel_mismatches": int((dev.view(np.int32) != cpu.view(np.int32)).sum()),
                      "gpu_vs_definition_mismatches": int((dev.view(np.int32) != defined.view(np.int32)).sum()),
                      "cpu_kernel_vs_definition_mismatches": int((cpu.view(np.int32) != defined.view(np.int32)).sum()),
                      "max_ulp": int(max(ulp_distance(dev, cpu).max(), ulp_distance(dev, defined).max()))})
    ok = all(p["gpu_vs_cpu_kernel_mismatches"] == 0 and p["gpu_vs_definition_mismatches"] == 0
             and p["cpu_kernel_vs_definition_mismatches"] == 0 for p in pairs)
    return {"ok": ok, "pairs": pairs}


# ------------------------------------------------------------------------ ops
def awkward_lists(n_many: int = 430):
    """(name, sizes, views): odd lengths with an empty tensor, and > 420 small tensors; each
    also as storage-offset views (the unaligned scalar path)."""
    odd = [1, 2, 3, 5, 4099, 0, 65_537, 16_384, 16_385, 7]
    many = [1 + (i * 7919) % 97 for i in range(n_many)]
    return [("odd", odd, False), ("odd_views", odd, True), ("many", many, False)]


def make(sizes, dtype, device, view, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n + 1, generator=g, dtype=torch.float64)
        if positive:
            x = x.abs() + 0.5
        x = x.to(dtype)
        x = x[1:] if view else x[:n].clone()
        out.append(x.to(device) if not view else _view_on(x, device))
    return out


def _view_on(x: torch.Tensor, device: str) -> torch.Tensor:
    """x (a view at storage offset 1) copied to `device` as a view at storage offset 1."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    buf[1:].copy_(x)
    return buf[1:]


def _clone(ts):
    return [_view_on(t, t.device.type) if t.storage_offset() == 1 else t.clone() for t in ts]


def compare(name: str, dev_list, cpu_list) -> dict:
    mismatches, max_diff = 0, 0.0
    for a, b in zip(dev_list, cpu_list):
        a, b = a.cpu(), b.cpu()
        if a.numel() == 0:
            continue
        ab = a.contiguous().view(torch.uint8).view(-1, a.element_size())
        bb = b.contiguous().view(torch.uint8).view(-1, b.element_size())
        differ = (ab != bb).any(dim=1)
        mismatches += int(differ.sum())
        if differ.any():   # over the differing elements only (equal infs differ by nothing)
            diff = (a.reshape(-1)[differ].double() - b.reshape(-1)[differ].double()).abs()
            max_diff = max(max_diff, float(diff.nan_to_num(float("inf")).max()))
    return {"tensor": name, "mismatches": mismatches, "max_abs_diff": max_diff}


def run_ops_once(device: str, sizes, dtype, view, inf_in_tail: bool):
    op = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    p0, g, w, s, u0, gm = (make(sizes, dtype, device, view, 1), make(sizes, dtype, device, view, 2),
                           make(sizes, op, device, view, 3), make(sizes, op, device, view, 4, True),
                           make(sizes, op, device, view, 5, True), make(sizes, op, device, view, 6))
    if inf_in_tail:
        last = max(i for i, n in enumerate(sizes) if n > 0)
        g[last][-1] = float("inf")
    bases = noise_bases(sizes)
    out = {}
    p, means = _clone(p0), [torch.empty_like(x) for x in w]
    _ops.sample_(p, means, s, bases, 300.0, 2 ** 64 - 1, 2 ** 32 + 3, True, None)
    out["sample.params"], out["sample.means"] = p, means
    offset = torch.full((1,), 9, dtype=torch.int64, device=device)
    p = _clone(p0)
    _ops.sample_(p, _clone(w), s, bases, 300.0, 7, 0, False, None, offset)
    out["sample.offset_tensor"] = p
    for first in (True, False):
        p, u, found = _clone(p0), _clone(u0), torch.zeros(1, device=device)
        _ops.perturb_(p, g, w, s, u, torch.tensor(0.05, dtype=torch.float64, device=device),
                      torch.tensor([0.5], device=device), first, found)
        out[f"perturb.first{int(first)}.params"], out[f"perturb.first{int(first)}.u"] = p, u
        out[f"perturb.first{int(first)}.found_inf"] = [found]
    found = torch.zeros(1, device=device)
    _ops.check_finite_(g, found)
    out["check_finite.found_inf"] = [found]
    for skip in (0.0, 1.0):
        for write_mean in (True, False):
            p, mm, mo, pr = _clone(p0), _clone(w), _clone(gm), _clone(s)
            _ops.update_(p, mm, mo, pr, g, u0, torch.tensor(1 / 3, dtype=torch.float64, device=device), 0.5,
                         torch.tensor(0.03, dtype=torch.float64, device=device), 0.9, 0.999, 1e-3, 0.1, write_mean,
                         torch.full((1,), skip, device=device))
            key = f"update.skip{int(skip)}.write_mean{int(write_mean)}"
            out[key + ".params"], out[key + ".means"], out[key + ".momenta"], out[key + ".precisions"] = p, mm, mo, pr
    return out


def section_ops(device: str) -> dict:
    results = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for name, sizes, view in awkward_lists():
            for inf in (False, True):
                dev = run_ops_once(device, sizes, dtype, view, inf)
                cpu = run_ops_once("cpu", sizes, dtype, view, inf)
                for key in dev:
                    r = compare(key, dev[key], cpu[key])
                    r.update(dtype=str(dtype).replace("torch.", ""), list=name, inf_in_tail=inf)
                    results.append(r)
    bad = [r for r in results if r["mismatches"]]
    worst = {}
    for r in results:
        worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), r["max_abs_diff"])
    return {"ok": not bad, "comparisons": len(results), "mismatching": bad[:20],
            "max_abs_diff_by_dtype": worst}


# ------------------------------------------------------------------------ graph
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.fc = torch.nn.Linear(27, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _bsam_step(model, opt, x, y, scaler=None):
    opt.sample_noise()
    loss = F.cross_entropy(model(x), y)
    (scaler.scale(loss) if scaler else loss).backward()
    opt.perturb(grad_scaler=scaler)
    loss = F.cross_entropy(model(x), y)
    (scaler.scale(loss) if scaler else loss).backward()


def section_graph(device: str) -> dict:
    if device != "cuda":
        return {"ok": None, "ran": False, "reason": "CUDA graphs need a GPU"}
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 5, 5, device=device), torch.randint(0, 3, (32,), device=device)
    torch.manual_seed(1)
    eager = Net().to(device)
    torch.manual_seed(1)
    graphed = Net().to(device)
    opt_e = BSAM(eager.parameters(), lr=0.05, num_data=100, backend="cuda", seed=5)
    lr = torch.tensor(0.05, device=device)
    opt_g = BSAM(graphed.parameters(), lr=lr, num_data=100, backend="cuda", seed=5, capturable=True)

    def step(model, opt):
        _bsam_step(model, opt, x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(graphed, opt_g)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(eager, opt_e)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, opt_g)
    max_diff = 0.0
    for _ in range(20):
        graph.replay()
        step(eager, opt_e)
    torch.cuda.synchronize()
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        for a, b in ((pe, pg), (opt_e.state[pe]["precision"], opt_g.state[pg]["precision"]),
                     (opt_e.state[pe]["momentum"], opt_g.state[pg]["momentum"])):
            max_diff = max(max_diff, float((a - b).abs().max()))
    offsets = {"eager": opt_e.noise_offset, "graphed": opt_g.noise_offset}

    # No host synchronisation inside the optimizer's part of a default step, a capturable
    # step, a GradScaler step and both (the backward passes are outside the checked region).
    sync_free = {}
    for name, capturable, use_scaler in (("default", False, False), ("capturable", True, False),
                                         ("grad_scaler", False, True), ("capturable+grad_scaler", True, True)):
        torch.manual_seed(2)
        model = Net().to(device)
        lr = 0.05 if name == "default" else torch.tensor(0.05, device=device)   # default: a user's float lr
        opt = BSAM(model.parameters(), lr=lr, num_data=100, backend="cuda", seed=1, capturable=capturable)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if use_scaler else None
        step(model, opt) if scaler is None else (_bsam_step(model, opt, x, y, scaler), scaler.step(opt),
                                                 scaler.update(), opt.zero_grad())
        try:
            torch.cuda.set_sync_debug_mode("error")
            opt.sample_noise()
            torch.cuda.set_sync_debug_mode(0)
            loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            torch.cuda.set_sync_debug_mode("error")
            opt.perturb(grad_scaler=scaler)
            torch.cuda.set_sync_debug_mode(0)
            loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            torch.cuda.set_sync_debug_mode("error")
            opt.step()     # finished by the optimizer itself: 1/scale kept from perturb()
            torch.cuda.set_sync_debug_mode(0)
            sync_free[name] = True
        except RuntimeError as exc:
            torch.cuda.set_sync_debug_mode(0)
            sync_free[name] = f"synchronised: {str(exc).splitlines()[0]}"
            opt.cancel_step()
        opt.zero_grad()

    # An AMP overflow step (inf in the perturbed gradient, through scaler.step) changes nothing.
    torch.manual_seed(3)
    model = Net().to(device)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cuda", seed=1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    _bsam_step(model, opt, x, y, scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = {(n, k): v.clone() for n, p in model.named_parameters() for k, v in opt.state[p].items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _bsam_step(model, opt, x, y, scaler)
    model.fc.weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(before[(n, k)], opt.state[p][k]) for n, p in model.named_parameters()
                    for k in opt.state[p]) and all(torch.equal(weights[n], p.detach())
                                                    for n, p in model.named_parameters())
    overflow = {"state_and_weights_unchanged": unchanged, "skipped_steps": opt.skipped_steps,
                "scale_backed_off": scaler.get_scale() < scale}
    # Last (a failure here loses none of the checks above): the whole training step, eager
    # against one graph replay, median of 20 runs of 10 steps each.
    try:
        cuda = torch.device(device)
        step_ms = {"eager": median_ms(lambda: [step(eager, opt_e) for _ in range(10)], cuda, 20) / 10,
                   "graph": median_ms(lambda: [graph.replay() for _ in range(10)], cuda, 20) / 10}
        timing = {"step_ms": step_ms, "graph_speedup": step_ms["eager"] / step_ms["graph"]}
    except RuntimeError as exc:
        timing = {"timing_error": f"{type(exc).__name__}: {exc}"}
    ok = (max_diff <= 1e-6 and offsets["eager"] == offsets["graphed"] == 23
          and all(v is True for v in sync_free.values()) and unchanged and opt.skipped_steps == 1)
    return {"ok": ok, "ran": True, "replays": 20, "max_abs_diff_graph_vs_eager": max_diff,
            "noise_offset": offsets, **timing, "sync_free": sync_free, "amp_overflow": overflow}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", required=True, choices=["noise", "ops", "graph"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--draws", type=int, default=10_500_000, help="noise draws per (seed, offset) pair")
    args = ap.parse_args(argv)
    start = time.time()
    record = {"section": args.section, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__}
    try:
        if args.device == "cuda" and not (torch.cuda.is_available() and _ops.has_kernel("cuda")):
            raise RuntimeError(f"CUDA kernels not available (cuda available: {torch.cuda.is_available()}, "
                               f"extension: {_ops.LOAD_ERROR or 'loaded'})")
        if args.section == "noise":
            record.update(section_noise(args.device, args.draws))
        elif args.section == "ops":
            record.update(section_ops(args.device))
        else:
            record.update(section_graph(args.device))
    except Exception as exc:  # one JSON line whatever happens
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
    record["seconds"] = round(time.time() - start, 1)
    print(json.dumps(record), flush=True)
    return 0 if record.get("ok") in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())

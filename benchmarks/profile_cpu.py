"""Where the time of a fused CPU bSAM step goes, next to fused AdamW (10M fp32 by default).

    python benchmarks/profile_cpu.py [--numel 1e7] [--out benchmarks/results/cpu_profile.txt]

Times each compiled op on one tensor: the sample phase with the Philox stream and with
given noise (their difference is the cost of drawing the noise), the normal generator on
its own, perturb, the inf/NaN check and update; then compares with the floor set by the
bytes model at the bandwidth fused AdamW itself reaches in the same run.
"""
import argparse
import statistics
import sys
import time

import torch

from bsam_fast import _ops
from bsam_fast.bench import device_name


def median_ms(fn, reps=20, warmup=3):
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=float, default=1e7)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not _ops.has_kernel("cpu"):
        sys.exit("the CPU kernels are not built")
    n = int(args.numel)
    t = lambda: [torch.randn(n)]
    p, w, g, u, gm, z = t(), t(), t(), t(), t(), t()
    s = [torch.rand(n) + 1]
    flag = torch.zeros(1)
    rows = {
        "sample (stream noise)": (median_ms(lambda: _ops.sample_(p, w, s, [0], 1e5, 1, 2, True, None)), 16),
        "sample (given noise)": (median_ms(lambda: _ops.sample_(p, w, s, [0], 1e5, 1, 2, True, z)), 20),
        "noise only (normal_ into a buffer)": (median_ms(lambda: torch.ops.bsam_fast.normal_(z, [0], 1, 2)), 4),
        "perturb": (median_ms(lambda: _ops.perturb_(p, g, w, s, u, 0.1, None, True, flag)), 20),
        "check_finite": (median_ms(lambda: _ops.check_finite_(g, flag)), 4),
        "update": (median_ms(lambda: _ops.update_(p, w, gm, s, g, u, 1.0, 1.0, 1e-3, 0.9, 0.999, 0.0, 0.1, False)), 32),
        "copy_ (read + write)": (median_ms(lambda: p[0].copy_(w[0])), 8),
    }
    param = torch.nn.Parameter(torch.randn(n))
    param.grad = torch.randn(n)
    adam = torch.optim.AdamW([param], lr=1e-3, fused=True)
    rows["AdamW(fused=True) step"] = (median_ms(adam.step), 28)
    adam_gbps = 28 * n / rows["AdamW(fused=True) step"][0] / 1e6
    step_ms = sum(rows[k][0] for k in ("sample (stream noise)", "perturb", "check_finite", "update"))
    copy_gbps = 8 * n / rows["copy_ (read + write)"][0] / 1e6
    # Given noise costs one extra 4-byte read per element that drawing it in place does not.
    noise_ms = rows["sample (stream noise)"][0] - rows["sample (given noise)"][0] + 4 * n / copy_gbps / 1e6
    lines = [f"# {device_name(torch.device('cpu'))}; torch {torch.__version__}; {n:,} fp32 parameters; median of 20",
             f"{'op':<38}{'ms':>9}{'bytes/elem':>11}{'GB/s':>8}"]
    for name, (ms, b) in rows.items():
        lines.append(f"{name:<38}{ms:>9.2f}{b:>11}{b * n / ms / 1e6:>8.1f}")
    floor_ms = 72 * n / adam_gbps / 1e6
    lines += ["",
              f"bSAM step (sample+perturb+check+update): {step_ms:.2f} ms = {step_ms / rows['AdamW(fused=True) step'][0]:.2f} x fused AdamW",
              f"  drawing the noise (sample with stream minus sample with given noise, plus the 4 B/elem it saves): ~{noise_ms:.1f} ms",
              f"  memory floor: 72 B/elem at fused AdamW's own {adam_gbps:.1f} GB/s = {floor_ms:.2f} ms "
              f"= {floor_ms / rows['AdamW(fused=True) step'][0]:.2f} x fused AdamW (which moves 28 B/elem)",
              f"  floor + noise = {(floor_ms + noise_ms) / rows['AdamW(fused=True) step'][0]:.2f} x fused AdamW"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

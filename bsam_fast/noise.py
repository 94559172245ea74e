"""The bSAM noise stream: counter-based Philox4x32-10 plus a Box-Muller transform.

Every backend (the pure-PyTorch reference, ``foreach``, and the compiled CPU and
CUDA kernels) draws the *same* standard-normal numbers, because a draw is a pure
function of ``(seed, offset, index)``:

* ``seed``   -- 64-bit Philox key, owned by the optimizer (saved in its state_dict);
* ``offset`` -- 64-bit draw counter, advanced by one for every noise sample;
* ``index``  -- global element index over the optimizer's whole parameter list.
  Every parameter starts at a multiple of 4 (see :func:`noise_bases`), so a tensor
  never shares a Philox block with its neighbour.

Element ``i`` of draw ``offset`` uses the Philox counter
``(block_lo, block_hi, offset_lo, offset_hi)`` with ``block = i // 4`` and takes
lane ``i % 4`` of the four normals made from that block's four 32-bit outputs
``x0..x3``: ``(r01*cos t1, r01*sin t1, r23*cos t3, r23*sin t3)`` where
``r01 = sqrt(-2 log u(x0))``, ``t1 = 2*pi*u(x1)`` and likewise for lanes 2-3.

``u(x) = ((x >> 9) + 0.5) * 2**-23`` lies strictly in (0, 1) and is exact in float32.
``log``, ``sin`` and ``cos`` are the Cephes float32 polynomials below, evaluated in
float32 with one rounding per operation (no fused multiply-add), so that the
reference here, the C++ kernels (``csrc/bsam_math.h``, built with
``-ffp-contract=off``) and the NumPy copy in the tests agree bit for bit.
The numbers are then cast to the parameter's optimizer dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .sharded import shard_start

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

# Cephes logf / sinf / cosf constants (float32).
LOG_SQRTHF = 0.707106781186547524
LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
            1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
            3.3333331174e-1)
LOG_C1 = 0.693359375          # ln 2 split in two parts: C1 + C2
LOG_C2 = -2.12194440e-4
SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
HALF_PI = 1.5707963267948966


def noise_bases(numels: Sequence[int]) -> list[int]:
    """Global start index of each tensor in the noise stream (each a multiple of 4)."""
    bases, base = [], 0
    for n in numels:
        bases.append(base)
        base += (int(n) + 3) // 4 * 4
    return bases


def continued_bases(existing: dict, params: Sequence, starts: Sequence[int]) -> list[int]:
    """Bases of parameters joining a stream laid out for `existing` ({parameter: base}):
    after every tensor before. The layout is over whole tensors (an FSDP2 parameter's
    numel is the full tensor's); a shard's base is where its first element lies (its
    `start` in the full tensor). Computed from the existing bases, so that a wrapper's
    copy of an optimizer's ``__dict__`` cannot hold a stale end."""
    end = max((base - shard_start(p) + (p.numel() + 3) // 4 * 4 for p, base in existing.items()), default=0)
    return [end + base + start for base, start in zip(noise_bases([p.numel() for p in params]), starts)]


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * x, for uint32 values held in int64.

    x is split in 16-bit halves so that no intermediate exceeds 2**49 (int64 safe).
    """
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    p_lo = x_lo * m                      # < 2**48
    p_hi = x_hi * m                      # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    lo = mid & MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counters; key given as two ints."""
    for r in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < PHILOX_ROUNDS:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _f32(x: float) -> float:
    """Round a Python float constant to float32, as the C++ header's literals are."""
    return float(torch.tensor(x, dtype=torch.float32))


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in (0, 1), exactly ((x >> 9) + 0.5) * 2**-23."""
    return ((x >> 9).to(torch.float32) + 0.5) * _f32(2.0 ** -23)


def cephes_log(u: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values, Cephes logf, one rounding per op."""
    bits = u.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 126                         # u = m * 2**e, m in [0.5, 1)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = m < _f32(LOG_SQRTHF)
    e = torch.where(small, e - 1, e).to(torch.float32)
    x = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = x * x
    y = torch.full_like(x, _f32(LOG_POLY[0]))
    for c in LOG_POLY[1:]:
        y = y * x + _f32(c)
    y = (y * x) * z
    y = y + e * _f32(LOG_C2)
    y = y - z * 0.5
    x = x + y
    return x + e * _f32(LOG_C1)


def sincos_2pi(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 2*pi*u for float32 u in [0, 1), with exact quadrant reduction."""
    v = u * 4.0                                   # exact
    q = torch.floor(v + 0.5)                      # nearest quadrant, 0..4
    x = (v - q) * _f32(HALF_PI)                   # v - q is exact; |x| <= pi/4
    z = x * x
    s = ((_f32(SIN_POLY[0]) * z + _f32(SIN_POLY[1])) * z + _f32(SIN_POLY[2])) * z * x + x
    c = (((_f32(COS_POLY[0]) * z + _f32(COS_POLY[1])) * z + _f32(COS_POLY[2])) * z) * z \
        - z * 0.5 + 1.0
    quadrant = q.to(torch.int64) & 3
    sin = torch.where(quadrant == 0, s, torch.where(quadrant == 1, c,
                      torch.where(quadrant == 2, -s, -c)))
    cos = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s,
                      torch.where(quadrant == 2, -c, s)))
    return sin, cos


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (IEEE-754, as C++ sqrtf and NumPy give).

    torch.sqrt on CPU may be 1 ulp off (vectorised math libraries), so take the float64
    root, round it, and keep whichever neighbour has the smallest exact residual
    |c*c - x| (c*c of a float32 is exact in float64; sqrt never ties).
    """
    xd = x.double()
    r = torch.sqrt(xd).float()
    best, best_err = r, (r.double() * r.double() - xd).abs()
    for c in (torch.nextafter(r, torch.full_like(r, -1.0)), torch.nextafter(r, torch.full_like(r, 3e38))):
        err = (c.double() * c.double() - xd).abs()
        best = torch.where(err < best_err, c, best)
        best_err = torch.minimum(err, best_err)
    return best


def normal_blocks(seed: int, offset: int, blocks: torch.Tensor) -> torch.Tensor:
    """Standard normals for the given Philox block indices: shape (len(blocks), 4), float32."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0 = blocks & MASK32
    c1 = blocks >> 32
    c2 = torch.full_like(blocks, offset & MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) & MASK32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1)
    out = []
    for xa, xb in ((x0, x1), (x2, x3)):
        radius = sqrt_rn(cephes_log(uniform_from_bits(xa)) * -2.0)
        sin, cos = sincos_2pi(uniform_from_bits(xb))
        out += [radius * cos, radius * sin]
    return torch.stack(out, dim=1)


def normal_like(tensors: Sequence[torch.Tensor], bases: Sequence[int], seed: int,
                offset: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The stream's standard normals for each tensor (shape of the tensor, given dtype):
    element j of tensor i is the stream's number at index ``bases[i] + j``.

    All tensors are drawn in one vectorised Philox evaluation on the first tensor's device.
    """
    if not tensors:
        return []
    device = tensors[0].device
    # A base need not be a multiple of 4 here (the shard of an FSDP2 parameter starts
    # where its rows do): the tensor then starts in lane base % 4 of its first block.
    spans = [(b // 4, (b + t.numel() + 3) // 4) for b, t in zip(bases, tensors)]
    blocks = torch.cat([torch.arange(first, end, dtype=torch.int64, device=device)
                        for first, end in spans])
    flat = normal_blocks(int(seed), int(offset), blocks).reshape(-1)
    out, start = [], 0
    for t, b, (first, end) in zip(tensors, bases, spans):
        lane = b % 4
        out.append(flat[start + lane:start + lane + t.numel()].view(t.shape)
                   .to(dtype or t.dtype, copy=True))
        start += 4 * (end - first)
    return out


def seed_from_default_generator() -> int:
    """A 63-bit seed drawn from torch's default CPU generator, so torch.manual_seed reproduces."""
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item()) * 2 + \
        int(torch.randint(0, 2, (1,), dtype=torch.int64).item())


def stream_seed(seed: int, stream: int) -> int:
    """Key of an independent sub-stream (e.g. a distributed rank): SplitMix64 of seed and stream."""
    z = (seed + (stream + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


__all__ = ["noise_bases", "normal_like", "normal_blocks", "philox4x32", "sqrt_rn",
           "seed_from_default_generator", "stream_seed"]

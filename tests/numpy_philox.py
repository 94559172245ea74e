"""An independent NumPy implementation of the bSAM noise stream (see bsam_fast/noise.py).

Written from the definition, not by calling the package: uint64 products for Philox,
float32 arithmetic with one rounding per operation for the transform.
"""
import numpy as np

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
F = np.float32


def philox4x32_10(counters: np.ndarray, key: tuple) -> np.ndarray:
    """counters: (n, 4) uint32 -> (n, 4) uint32."""
    c = counters.astype(np.uint64)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    mask = np.uint64(0xFFFFFFFF)
    for r in range(10):
        p0 = np.uint64(M0) * c[:, 0]
        p1 = np.uint64(M1) * c[:, 2]
        c = np.stack([(p1 >> np.uint64(32)) ^ c[:, 1] ^ k0, p1 & mask,
                      (p0 >> np.uint64(32)) ^ c[:, 3] ^ k1, p0 & mask], axis=1)
        if r < 9:
            k0, k1 = (k0 + np.uint64(W0)) & mask, (k1 + np.uint64(W1)) & mask
    return c.astype(np.uint32)


def uniform(x):
    return ((x >> np.uint32(9)).astype(F) + F(0.5)) * F(2.0 ** -23)


def log_f32(u):
    bits = u.view(np.int32)
    e = ((bits >> 23) & 0xFF) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(np.float32)
    small = m < F(0.707106781186547524)
    e = np.where(small, e - 1, e).astype(F)
    x = np.where(small, (m + m) - F(1), m - F(1)).astype(F)
    z = x * x
    y = F(7.0376836292e-2)
    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
              -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * x + F(c)
    y = (y * x) * z
    y = y + e * F(-2.12194440e-4)
    y = y - z * F(0.5)
    x = x + y
    return x + e * F(0.693359375)


def sincos_2pi(u):
    v = u * F(4)
    q = np.floor(v + F(0.5))
    x = (v - q) * F(1.5707963267948966)
    z = x * x
    s = ((F(-1.9515295891e-4) * z + F(8.3321608736e-3)) * z + F(-1.6666654611e-1)) * z * x + x
    c = (((F(2.443315711809948e-5) * z + F(-1.388731625493765e-3)) * z
          + F(4.166664568298827e-2)) * z) * z - z * F(0.5) + F(1)
    quad = q.astype(np.int64) & 3
    sin = np.select([quad == 0, quad == 1, quad == 2], [s, c, -s], -c)
    cos = np.select([quad == 0, quad == 1, quad == 2], [c, -s, -c], s)
    return sin.astype(F), cos.astype(F)


def normals(seed: int, offset: int, start: int, n: int) -> np.ndarray:
    """n float32 normals of draw `offset`, from global index `start` (a multiple of 4)."""
    assert start % 4 == 0
    blocks = np.arange(start // 4, start // 4 + (n + 3) // 4, dtype=np.uint64)
    counters = np.stack([blocks & np.uint64(0xFFFFFFFF), blocks >> np.uint64(32),
                         np.full_like(blocks, offset & 0xFFFFFFFF),
                         np.full_like(blocks, (offset >> 32) & 0xFFFFFFFF)], axis=1)
    x = philox4x32_10(counters.astype(np.uint32), (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    out = []
    for a, b in ((0, 1), (2, 3)):
        r = np.sqrt(log_f32(uniform(x[:, a])) * F(-2))
        sin, cos = sincos_2pi(uniform(x[:, b]))
        out += [r * cos, r * sin]
    return np.stack(out, axis=1).reshape(-1)[:n]

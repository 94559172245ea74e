// bsam_math.h -- the arithmetic of bSAM, shared by the CPU and CUDA kernels.
//
// Everything here is a pure function of its arguments and compiles for host and device,
// so both devices draw the same noise and apply the same update. The noise stream is
// defined in bsam_fast/noise.py: Philox4x32-10 keyed by the 64-bit seed, counter
// (block_lo, block_hi, offset_lo, offset_hi) for Philox block `block` (4 elements) of
// draw `offset`, then a Box-Muller transform with Cephes float32 log/sin/cos.
//
// Build with -ffp-contract=off (host) / --fmad=false or the *_rn intrinsics (device):
// every float operation below must round once, as NumPy's and torch's do, for the
// streams to agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BSAM_HD __host__ __device__ __forceinline__
#else
#define BSAM_HD inline
#endif

// Host builds for one instruction set (csrc/cpu/kernels.cpp, built once per set) put all of
// this in the inline namespace bsam::<CPU_CAPABILITY>, so that the copies of these inline
// functions compiled for different sets stay apart at link time.
#if defined(CPU_CAPABILITY) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define BSAM_MATH_VARIANT 1
#endif

namespace bsam {
#ifdef BSAM_MATH_VARIANT
inline namespace CPU_CAPABILITY {
#endif

// ---------------------------------------------------------------- Philox4x32-10
struct uint4x32 { uint32_t x[4]; };

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

BSAM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

BSAM_HD uint4x32 philox4x32_10(uint4x32 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.x[0], hi0, lo0);
    mulhilo32(kPhiloxM1, c.x[2], hi1, lo1);
    c = uint4x32{{hi1 ^ c.x[1] ^ k0, lo1, hi0 ^ c.x[3] ^ k1, lo0}};
    k0 += kPhiloxW0;  // the bump after the last round is never used
    k1 += kPhiloxW1;
  }
  return c;
}

// ---------------------------------------------------------------- float32 transforms
// Bit casts that keep loops vectorisable on the host (no memory round trip).
BSAM_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}
BSAM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// cond ? a : b, and -x if cond else x, as integer operations on the bits: the same values
// as the branches, but with no float operation that runs only on one side, so compilers
// vectorise the loops over them even where they may not speculate float operations (AVX2).
BSAM_HD float choose(bool cond, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return bits_to_float((float_to_bits(a) & mask) | (float_to_bits(b) & ~mask));
}
BSAM_HD float negate_if(bool cond, float x) {
  return bits_to_float(float_to_bits(x) ^ (static_cast<uint32_t>(cond) << 31));
}

// u in (0, 1), exactly ((x >> 9) + 0.5) * 2^-23.
BSAM_HD float uniform_open01(uint32_t x) {
  // x >> 9 < 2^23 converts exactly; as a signed int, which SIMD units convert directly.
  return (static_cast<float>(static_cast<int32_t>(x >> 9)) + 0.5f) * 1.1920928955078125e-07f;
}

// Natural log of a positive normal float (Cephes logf). Selects instead of branches, so
// that loops over it vectorise.
BSAM_HD float cephes_logf(float u) {
  const uint32_t bits = float_to_bits(u);
  const float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // u = m * 2^e
  const bool small = m < 0.707106781186547524f;
  const int e = static_cast<int>((bits >> 23) & 0xFFu) - 126 - static_cast<int>(small);
  const float fe = static_cast<float>(e);
  float x = choose(small, m + m, m) - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x + -1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x + -1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x + -1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x + -2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = (y * x) * z;
  y = y + fe * -2.12194440e-4f;
  y = y - z * 0.5f;
  x = x + y;
  return x + fe * 0.693359375f;
}

struct SinCos { float sin, cos; };

// sin and cos of 2*pi*u for u in [0, 1): exact quadrant reduction, Cephes polynomials.
BSAM_HD SinCos sincos_2pi(float u) {
  const float v = u * 4.0f;
  // floor(v + 0.5) as a truncating conversion (v + 0.5 > 0): vectorises where floorf won't.
  const int quadrant_index = static_cast<int>(v + 0.5f);
  const float q = static_cast<float>(quadrant_index);
  const float x = (v - q) * 1.5707963267948966f;
  const float z = x * x;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z + -1.6666654611e-1f) * z * x + x;
  const float c = (((2.443315711809948e-5f * z + -1.388731625493765e-3f) * z +
                    4.166664568298827e-2f) * z) * z - z * 0.5f + 1.0f;
  // angle = quadrant * pi/2 + x: odd quadrants swap sin and cos; signs flip by quadrant.
  const int quadrant = quadrant_index & 3;
  const bool swap = (quadrant & 1) != 0;
  return SinCos{negate_if((quadrant & 2) != 0, choose(swap, c, s)),
                negate_if(((quadrant + 1) & 2) != 0, choose(swap, s, c))};
}

// sqrt(-2 log u): the Box-Muller radius (sqrtf is IEEE-exact everywhere).
BSAM_HD float box_muller_radius(uint32_t x) {
  return sqrtf(cephes_logf(uniform_open01(x)) * -2.0f);
}

// The four standard normals of Philox block `block` in draw `offset`.
BSAM_HD void normal4(uint64_t seed, uint64_t offset, uint64_t block, float out[4]) {
  const uint4x32 counter{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                          static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  const uint4x32 r = philox4x32_10(counter, static_cast<uint32_t>(seed),
                                   static_cast<uint32_t>(seed >> 32));
  for (int pair = 0; pair < 2; ++pair) {
    const float radius = box_muller_radius(r.x[2 * pair]);
    const SinCos angle = sincos_2pi(uniform_open01(r.x[2 * pair + 1]));
    out[2 * pair] = radius * angle.cos;
    out[2 * pair + 1] = radius * angle.sin;
  }
}

// ---------------------------------------------------------------- the update, per element
// Each line as in bsam_fast/backends/reference.py, with the same order of operations. T is the
// arithmetic type: float or double, or a SIMD vector of them on the CPU (cpu/kernels.cpp
// declares sqrt_of/abs_of for at::vec::Vectorized before including this header).
BSAM_HD float sqrt_of(float x) { return sqrtf(x); }
BSAM_HD double sqrt_of(double x) { return sqrt(x); }
BSAM_HD float abs_of(float x) { return fabsf(x); }
BSAM_HD double abs_of(double x) { return fabs(x); }

template <typename T>
BSAM_HD T noisy_point(T w, T s, T xi, T num_data) { return w + xi / sqrt_of(num_data * s); }

template <typename T>
BSAM_HD T gradient_magnitude(T s, T g) { return sqrt_of(s) * abs_of(g); }

template <typename T>
BSAM_HD T perturbed_point(T w, T s, T g, T rho) { return w + (rho * g) / s; }

template <typename T>
struct UpdateCoefficients {
  T lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, damping;
};

// gm, w and s in place; returns nothing. g and u already carry their 1/m and 1/scale.
template <typename T>
BSAM_HD void posterior_update(T& w, T& gm, T& s, T g, T u, const UpdateCoefficients<T>& k) {
  gm = k.beta1 * gm + k.one_minus_beta1 * (g + k.weight_decay * w);
  w = w - (k.lr * gm) / s;
  s = k.beta2 * s + k.one_minus_beta2 * ((u + k.damping) + k.weight_decay);
}

// 1 for inf and NaN (all exponent bits set), else 0: integer arithmetic, so an
// OR-reduction over a loop vectorises.
BSAM_HD uint32_t non_finite(float x) {
  return (float_to_bits(x) & 0x7F800000u) == 0x7F800000u;
}
BSAM_HD uint32_t non_finite(double x) {
#if defined(__CUDA_ARCH__)
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
#else
  const uint64_t bits = __builtin_bit_cast(uint64_t, x);
#endif
  return (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
}

#ifdef BSAM_MATH_VARIANT
}  // namespace CPU_CAPABILITY
#endif
}  // namespace bsam

// kernels.cpp -- the CPU kernels' loops over one chunk, built once per instruction set.
//
// The build compiles this file with CPU_CAPABILITY (and CPU_CAPABILITY_AVX2/_AVX512, and
// the matching -m flags) set as ATen sets them for its own kernels; see kernels.h. Only
// loops over raw pointers live here: argument checks, dtype dispatch and threading are in
// bsam_cpu.cpp, built for the baseline. No code of this file may run before its table is
// chosen: the table is constant-initialised, and the one static initialiser the headers
// bring in (<iostream>'s) holds no vector instruction (a ctest checks both).
//
// Inner loops work on tiles of kTile elements with plain arithmetic from bsam_math.h, which
// the compiler vectorises: at::vec::Vectorized for fp32/fp64 parameters, scalar loops for
// bf16/fp16 (converted to fp32) and tails. Noise is a pure function of the global element
// index, so it does not depend on the number of threads or on where chunks begin.
#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels.cpp is built once per instruction set, with CPU_CAPABILITY set (setup.py, CMakeLists.txt)"
#endif

#include "kernels.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

namespace bsam {
inline namespace CPU_CAPABILITY {
// Vector forms of the two non-arithmetic operations bsam_math.h's formulas use; declared
// before the header so that its templates find them.
template <typename T>
at::vec::Vectorized<T> sqrt_of(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
at::vec::Vectorized<T> abs_of(const at::vec::Vectorized<T>& x) { return x.abs(); }
}  // namespace CPU_CAPABILITY
}  // namespace bsam

#include "../bsam_math.h"  // in bsam::CPU_CAPABILITY too (it opens that inline namespace)

#ifndef BSAM_CPU_KERNELS_NAME
#define BSAM_CPU_KERNELS_STRING(x) #x
#define BSAM_CPU_KERNELS_NAME_OF(x) BSAM_CPU_KERNELS_STRING(x)
#define BSAM_CPU_KERNELS_NAME BSAM_CPU_KERNELS_NAME_OF(CPU_CAPABILITY)
#endif

namespace bsam {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kTile = 256;  // elements per inner loop (a multiple of 4)

// OR of non_finite() over the lanes of an accumulator of (x - x) terms (0, or NaN once any
// x was inf or NaN).
template <typename T>
bool any_non_finite(const Vec<T>& acc) {
  __at_align__ T lanes[Vec<T>::size()];
  acc.store(lanes);
  uint32_t bad = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) bad |= non_finite(lanes[i]);
  return bad != 0;
}

// Fills z[0..n) with the stream's normals for global indices first_index ... (a multiple
// of 4). Structure of arrays: each stage is its own loop over the tile's Philox blocks,
// which the compiler vectorises (normal4() per block does not).
template <typename T>
void stream_tile(uint64_t seed, uint64_t offset, int64_t first_index, int64_t n, T* z) {
  constexpr int64_t kBlocks = kTile / 4;
  const uint64_t first_block = static_cast<uint64_t>(first_index) / 4;
  alignas(64) uint32_t x[4][kBlocks];
  alignas(64) float radius[2][kBlocks];
  alignas(64) SinCos angle[2][kBlocks];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t b = 0; b < kBlocks; ++b) {
    const uint64_t block = first_block + b;
    const uint4x32 r = philox4x32_10(
        uint4x32{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                  static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}}, key0, key1);
    x[0][b] = r.x[0]; x[1][b] = r.x[1]; x[2][b] = r.x[2]; x[3][b] = r.x[3];
  }
  for (int pair = 0; pair < 2; ++pair) {
    for (int64_t b = 0; b < kBlocks; ++b) radius[pair][b] = box_muller_radius(x[2 * pair][b]);
    for (int64_t b = 0; b < kBlocks; ++b) angle[pair][b] = sincos_2pi(uniform_open01(x[2 * pair + 1][b]));
  }
  alignas(64) float out[kTile];
  for (int64_t b = 0; b < kBlocks; ++b) {
    out[4 * b] = radius[0][b] * angle[0][b].cos;
    out[4 * b + 1] = radius[0][b] * angle[0][b].sin;
    out[4 * b + 2] = radius[1][b] * angle[1][b].cos;
    out[4 * b + 3] = radius[1][b] * angle[1][b].sin;
  }
  for (int64_t k = 0; k < n; ++k) z[k] = static_cast<T>(out[k]);
}

// ------------------------------------------------------------------------------ sample_
template <typename scalar_t, bool kLoadMean>
void sample_chunk(scalar_t* __restrict__ p, at::opmath_type<scalar_t>* __restrict__ w,
                  const at::opmath_type<scalar_t>* __restrict__ s,
                  const at::opmath_type<scalar_t>* __restrict__ noise, int64_t begin, int64_t end,
                  int64_t base, double num_data, uint64_t seed, uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t n_data = static_cast<opmath_t>(num_data);
  alignas(64) opmath_t z[kTile];
  for (int64_t j = begin; j < end; j += kTile) {
    const int64_t n = std::min(kTile, end - j);
    const opmath_t* xi = z;
    if (noise) {
      xi = noise + j;
    } else {
      stream_tile(seed, offset, base + j, n, z);
    }
    int64_t k = 0;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      using V = Vec<opmath_t>;
      const V nd(n_data);
      for (; k + V::size() <= n; k += V::size()) {
        const V mean = kLoadMean ? V::loadu(p + j + k) : V::loadu(w + j + k);
        if (kLoadMean) mean.store(w + j + k);
        noisy_point(mean, V::loadu(s + j + k), V::loadu(xi + k), nd).store(p + j + k);
      }
    }
    for (; k < n; ++k) {
      const opmath_t mean = kLoadMean ? static_cast<opmath_t>(p[j + k]) : w[j + k];
      if (kLoadMean) w[j + k] = mean;
      p[j + k] = static_cast<scalar_t>(noisy_point(mean, s[j + k], xi[k], n_data));
    }
  }
}

// ------------------------------------------------------------------------------ perturb_
template <typename scalar_t, bool kFirstPart>
bool perturb_chunk(scalar_t* __restrict__ p, const scalar_t* __restrict__ grad,
                   const at::opmath_type<scalar_t>* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ s,
                   at::opmath_type<scalar_t>* __restrict__ u, int64_t begin, int64_t end, double rho_arg,
                   double inv_scale_arg) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t rho = static_cast<opmath_t>(rho_arg), inv_scale = static_cast<opmath_t>(inv_scale_arg);
  uint32_t bad = 0;
  int64_t j = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using V = Vec<opmath_t>;
    const V inv(inv_scale), r(rho);
    V acc(0);
    for (; j + V::size() <= end; j += V::size()) {
      const V g = V::loadu(grad + j) * inv;
      acc = acc + (g - g);
      const V sv = V::loadu(s + j);
      const V magnitude = gradient_magnitude(sv, g);
      (kFirstPart ? magnitude : V::loadu(u + j) + magnitude).store(u + j);
      perturbed_point(V::loadu(w + j), sv, g, r).store(p + j);
    }
    bad |= any_non_finite(acc);
  }
  for (; j < end; ++j) {
    const opmath_t g = static_cast<opmath_t>(grad[j]) * inv_scale;
    bad |= non_finite(g);
    const opmath_t magnitude = gradient_magnitude(s[j], g);
    u[j] = kFirstPart ? magnitude : u[j] + magnitude;
    p[j] = static_cast<scalar_t>(perturbed_point(w[j], s[j], g, rho));
  }
  return bad != 0;
}

// ------------------------------------------------------------------------------ check_finite_
template <typename scalar_t>
bool check_finite_chunk(const scalar_t* __restrict__ x, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  uint32_t bad = 0;
  for (int64_t j = begin; j < end; ++j) bad |= non_finite(static_cast<opmath_t>(x[j]));
  return bad != 0;
}

// ------------------------------------------------------------------------------ update_
template <typename scalar_t, bool kWriteMean>
void update_chunk(scalar_t* __restrict__ p, at::opmath_type<scalar_t>* __restrict__ w,
                  at::opmath_type<scalar_t>* __restrict__ gm, at::opmath_type<scalar_t>* __restrict__ s,
                  const scalar_t* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ u,
                  int64_t begin, int64_t end, const UpdateScalars& k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t grad_factor = static_cast<opmath_t>(k.grad_factor), u_factor = static_cast<opmath_t>(k.u_factor);
  const UpdateCoefficients<opmath_t> coef{
      static_cast<opmath_t>(k.lr), static_cast<opmath_t>(k.beta1), static_cast<opmath_t>(1.0 - k.beta1),
      static_cast<opmath_t>(k.beta2), static_cast<opmath_t>(1.0 - k.beta2),
      static_cast<opmath_t>(k.weight_decay), static_cast<opmath_t>(k.damping)};
  int64_t j = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using V = Vec<opmath_t>;
    const UpdateCoefficients<V> vcoef{V(coef.lr), V(coef.beta1), V(coef.one_minus_beta1), V(coef.beta2),
                                      V(coef.one_minus_beta2), V(coef.weight_decay), V(coef.damping)};
    const V gf(grad_factor), uf(u_factor);
    for (; j + V::size() <= end; j += V::size()) {
      V w_j = V::loadu(w + j), gm_j = V::loadu(gm + j), s_j = V::loadu(s + j);
      posterior_update(w_j, gm_j, s_j, V::loadu(grad + j) * gf, V::loadu(u + j) * uf, vcoef);
      gm_j.store(gm + j);
      s_j.store(s + j);
      if (kWriteMean) w_j.store(w + j);
      w_j.store(p + j);
    }
  }
  for (; j < end; ++j) {
    opmath_t w_j = w[j], gm_j = gm[j], s_j = s[j];
    posterior_update(w_j, gm_j, s_j, static_cast<opmath_t>(grad[j]) * grad_factor, u[j] * u_factor, coef);
    gm[j] = gm_j;
    s[j] = s_j;
    if (kWriteMean) w[j] = w_j;
    p[j] = static_cast<scalar_t>(w_j);
  }
}

// ------------------------------------------------------------------------------ normal_
void normal_chunk(float* z, int64_t begin, int64_t end, int64_t base, uint64_t seed, uint64_t offset) {
  for (int64_t j = begin; j < end; j += kTile) {
    stream_tile(seed, offset, base + j, std::min(kTile, end - j), z + j);
  }
}

template <typename scalar_t>
constexpr ChunkKernelsFor<scalar_t> kernels_for() {
  return {{&sample_chunk<scalar_t, false>, &sample_chunk<scalar_t, true>},
          {&perturb_chunk<scalar_t, false>, &perturb_chunk<scalar_t, true>},
          {&update_chunk<scalar_t, false>, &update_chunk<scalar_t, true>},
          &check_finite_chunk<scalar_t>};
}

}  // namespace

// Constant-initialised (no code runs at load), named bsam::<CPU_CAPABILITY>::chunk_kernels.
extern const ChunkKernels chunk_kernels;
const ChunkKernels chunk_kernels{BSAM_CPU_KERNELS_NAME, kernels_for<float>(), kernels_for<double>(),
                                 kernels_for<c10::Half>(), kernels_for<c10::BFloat16>(), &normal_chunk};

}  // namespace CPU_CAPABILITY
}  // namespace bsam

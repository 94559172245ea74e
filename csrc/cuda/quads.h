// quads.h -- what each CUDA kernel does to one quad (up to 4 consecutive elements of one
// tensor), as host-and-device functors: the kernels in bsam_cuda.cu and the host emulation
// in csrc/tests/test_cuda_emulation.cpp run exactly this code. The arithmetic is
// bsam_math.h's, in opmath (fp32 for bf16/fp16 parameters), the same as the CPU kernels.
//
// Each functor has
//   kDepth             the number of tensor lists in its TensorListArgs, in the op's order;
//   kFlagsNonFinite    whether its quads report inf/NaN (ORed over the block into found_inf);
//   read_device_scalars()  reads what a captured CUDA graph must see change between
//                      replays (noise counter, lr, rho, GradScaler's 1/scale, skip flag)
//                      from device memory, once per thread before the first quad;
//   operator()(args, t, i, n)  the quad t[i..i+n), n in 1..4; returns "saw inf/NaN".
// Lanes k >= n of a tail quad compute on zeros and are never stored.
#pragma once

#include <cstdint>

#include "../bsam_math.h"
#include "multi_tensor.h"

namespace bsam {

// A one-element float32 or float64 tensor read by the kernel (lr, rho, a gradient factor),
// so that a schedule writing it in place drives a captured graph and no conversion is
// launched per call; ptr == nullptr: not given.
struct ScalarRef {
  const void* ptr = nullptr;
  bool is_double = false;

  BSAM_HD bool given() const { return ptr != nullptr; }
  BSAM_HD double read() const {
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

// params (a!) := means + xi / sqrt(N * precisions); kLoadMean: means := params first.
template <typename scalar_t, typename opmath_t, bool kLoadMean, bool kGivenNoise>
struct SampleQuad {
  static constexpr int kDepth = 4;  // params, means, precisions, noise (means again if none)
  static constexpr bool kFlagsNonFinite = false;
  opmath_t num_data;
  uint64_t seed, offset;
  const int64_t* offset_ptr;  // device noise counter (capturable), or nullptr

  BSAM_HD void read_device_scalars() {
    if (offset_ptr != nullptr) offset = static_cast<uint64_t>(*offset_ptr);
  }

  BSAM_HD bool operator()(const TensorListArgs<kDepth>& a, int t, int64_t i, int n) const {
    auto* p = static_cast<scalar_t*>(a.ptr[0][t]);
    auto* w = static_cast<opmath_t*>(a.ptr[1][t]);
    const auto* s = static_cast<const opmath_t*>(a.ptr[2][t]);
    opmath_t xi[4] = {}, mean[4] = {}, prec[4] = {}, out[4];
    if constexpr (kGivenNoise) {
      load4(static_cast<const opmath_t*>(a.ptr[3][t]), i, n, xi);
    } else {
      float z[4];
      normal4(seed, offset, static_cast<uint64_t>(a.base[t] + i) / 4, z);
      BSAM_UNROLL
      for (int k = 0; k < 4; ++k) xi[k] = static_cast<opmath_t>(z[k]);
    }
    if constexpr (kLoadMean) {
      load4(p, i, n, mean);
      store4(w, i, n, mean);
    } else {
      load4(w, i, n, mean);
    }
    load4(s, i, n, prec);
    BSAM_UNROLL
    for (int k = 0; k < 4; ++k) out[k] = noisy_point(mean[k], prec[k], xi[k], num_data);
    store4(p, i, n, out);
    return false;
  }
};

// g = grads * inv_scale; u_sums (+)= sqrt(s) * |g|; params := means + rho * g / s.
template <typename scalar_t, typename opmath_t, bool kFirstPart>
struct PerturbQuad {
  static constexpr int kDepth = 5;  // params, grads, means, precisions, u_sums
  static constexpr bool kFlagsNonFinite = true;
  opmath_t rho, inv_scale;
  ScalarRef rho_ref;            // rho as a device tensor, or not given
  const float* inv_scale_ptr;   // a GradScaler's 1/scale, or nullptr (then inv_scale = 1)

  BSAM_HD void read_device_scalars() {
    if (rho_ref.given()) rho = static_cast<opmath_t>(rho_ref.read());
    if (inv_scale_ptr != nullptr) inv_scale = static_cast<opmath_t>(*inv_scale_ptr);
  }

  BSAM_HD bool operator()(const TensorListArgs<kDepth>& a, int t, int64_t i, int n) const {
    opmath_t g[4] = {}, w[4] = {}, s[4] = {}, u[4] = {}, out[4];
    load4(static_cast<const scalar_t*>(a.ptr[1][t]), i, n, g);
    load4(static_cast<const opmath_t*>(a.ptr[2][t]), i, n, w);
    load4(static_cast<const opmath_t*>(a.ptr[3][t]), i, n, s);
    auto* u_sum = static_cast<opmath_t*>(a.ptr[4][t]);
    if constexpr (!kFirstPart) load4(u_sum, i, n, u);
    uint32_t bad = 0;
    BSAM_UNROLL
    for (int k = 0; k < 4; ++k) {
      g[k] = g[k] * inv_scale;
      if (k < n) bad |= non_finite(g[k]);
      const opmath_t magnitude = gradient_magnitude(s[k], g[k]);
      u[k] = kFirstPart ? magnitude : u[k] + magnitude;
      out[k] = perturbed_point(w[k], s[k], g[k], rho);
    }
    store4(u_sum, i, n, u);
    store4(static_cast<scalar_t*>(a.ptr[0][t]), i, n, out);
    return bad != 0;
  }
};

// Reports whether any element is inf or NaN.
template <typename scalar_t, typename opmath_t>
struct CheckFiniteQuad {
  static constexpr int kDepth = 1;
  static constexpr bool kFlagsNonFinite = true;

  BSAM_HD void read_device_scalars() {}

  BSAM_HD bool operator()(const TensorListArgs<kDepth>& a, int t, int64_t i, int n) const {
    opmath_t x[4] = {};
    load4(static_cast<const scalar_t*>(a.ptr[0][t]), i, n, x);
    uint32_t bad = 0;
    BSAM_UNROLL
    for (int k = 0; k < 4; ++k) {
      if (k < n) bad |= non_finite(x[k]);
    }
    return bad != 0;
  }
};

// Momentum, mean and precision update (bsam_math.h's posterior_update); params := mean.
// A non-zero skip flag puts the mean back and writes nothing else.
template <typename scalar_t, typename opmath_t, bool kWriteMean>
struct UpdateQuad {
  static constexpr int kDepth = 6;  // params, means, momenta, precisions, grads, u_sums
  static constexpr bool kFlagsNonFinite = false;
  UpdateCoefficients<opmath_t> coef;
  opmath_t grad_factor, u_factor;
  ScalarRef grad_factor_ref;      // 1/m times a GradScaler's 1/scale, or not given
  ScalarRef lr_ref;               // lr as a device tensor, or not given
  const float* skip_ptr;          // skip the step where non-zero, or nullptr
  bool skip;

  BSAM_HD void read_device_scalars() {
    skip = skip_ptr != nullptr && *skip_ptr != 0.0f;
    if (lr_ref.given()) coef.lr = static_cast<opmath_t>(lr_ref.read());
    if (grad_factor_ref.given()) grad_factor = static_cast<opmath_t>(grad_factor_ref.read());
  }

  BSAM_HD bool operator()(const TensorListArgs<kDepth>& a, int t, int64_t i, int n) const {
    auto* p = static_cast<scalar_t*>(a.ptr[0][t]);
    auto* w_ptr = static_cast<opmath_t*>(a.ptr[1][t]);
    opmath_t w[4] = {};
    load4(w_ptr, i, n, w);
    if (skip) {
      store4(p, i, n, w);
      return false;
    }
    auto* gm_ptr = static_cast<opmath_t*>(a.ptr[2][t]);
    auto* s_ptr = static_cast<opmath_t*>(a.ptr[3][t]);
    opmath_t gm[4] = {}, s[4] = {}, g[4] = {}, u[4] = {};
    load4(gm_ptr, i, n, gm);
    load4(s_ptr, i, n, s);
    load4(static_cast<const scalar_t*>(a.ptr[4][t]), i, n, g);
    load4(static_cast<const opmath_t*>(a.ptr[5][t]), i, n, u);
    BSAM_UNROLL
    for (int k = 0; k < 4; ++k) posterior_update(w[k], gm[k], s[k], g[k] * grad_factor, u[k] * u_factor, coef);
    store4(gm_ptr, i, n, gm);
    store4(s_ptr, i, n, s);
    if constexpr (kWriteMean) store4(w_ptr, i, n, w);
    store4(p, i, n, w);
    return false;
  }
};

// out (float32) := the stream's normals.
struct NormalQuad {
  static constexpr int kDepth = 1;
  static constexpr bool kFlagsNonFinite = false;
  uint64_t seed, offset;

  BSAM_HD void read_device_scalars() {}

  BSAM_HD bool operator()(const TensorListArgs<kDepth>& a, int t, int64_t i, int n) const {
    float z[4];
    normal4(seed, offset, static_cast<uint64_t>(a.base[t] + i) / 4, z);
    store4(static_cast<float*>(a.ptr[0][t]), i, n, z);
    return false;
  }
};

}  // namespace bsam

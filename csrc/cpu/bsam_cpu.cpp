// bsam_cpu.cpp -- CPU kernels of the bsam_fast ops (schemas in csrc/ops.cpp).
//
// Each op makes one pass over all tensors of its list: the tensors are cut into chunks of
// kChunk elements, and at::parallel_for spreads the chunks over threads. Inner loops work
// on tiles of kTile elements with plain arithmetic from bsam_math.h, which the compiler
// vectorises: at::vec::Vectorized for fp32/fp64 parameters, scalar loops for bf16/fp16
// (converted to fp32) and tails. The formulas are bsam_math.h's, instantiated for both.
// Noise is a pure function of the global element index, so it does not depend on the
// number of threads or on where chunks begin.
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace bsam {
// Vector forms of the two non-arithmetic operations bsam_math.h's formulas use; declared
// before the header so that its templates find them.
template <typename T>
at::vec::Vectorized<T> sqrt_of(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
at::vec::Vectorized<T> abs_of(const at::vec::Vectorized<T>& x) { return x.abs(); }
}  // namespace bsam

#include "../bsam_math.h"
#include "../checks.h"

namespace bsam {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

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

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task (a multiple of kTile)
constexpr int64_t kTile = 256;       // elements per inner loop (a multiple of 4)

struct Chunk {
  int64_t tensor, begin, end;
  int64_t global_begin;  // position of `begin` in the concatenation of all tensors
};

std::vector<Chunk> make_chunks(at::TensorList tensors, int64_t& total) {
  std::vector<Chunk> chunks;
  total = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      chunks.push_back({i, begin, std::min(n, begin + kChunk), total + begin});
    }
    total += n;
  }
  return chunks;
}

// Runs fn(chunk) over every chunk in parallel; returns true if any call returned true.
// Threads split the concatenated elements evenly (a chunk goes to the thread whose range
// holds its first element), so a list of unequal tensors is balanced like one tensor.
template <typename Fn>
bool parallel_chunks(at::TensorList tensors, const Fn& fn) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(tensors, total);
  std::atomic<bool> flagged{false};
  at::parallel_for(0, total, kChunk, [&](int64_t first, int64_t last) {
    auto it = std::lower_bound(chunks.begin(), chunks.end(), first,
                               [](const Chunk& c, int64_t x) { return c.global_begin < x; });
    bool local = false;
    for (; it != chunks.end() && it->global_begin < last; ++it) local |= fn(*it);
    if (local) flagged.store(true, std::memory_order_relaxed);
  });
  return flagged.load();
}

void raise_flag(const at::Tensor& found_inf, bool found) {
  if (found) found_inf.fill_(1.0);
}

template <typename T>
T* ptr(const at::Tensor& t) { return t.data_ptr<T>(); }

// Fills z[0..n) with the stream's normals for global indices first_index ... (a multiple
// of 4). Structure of arrays: each stage is its own loop over the tile's Philox blocks,
// which the compiler vectorises (normal4() per block does not).
template <typename T>
void stream_tile(uint64_t seed, uint64_t offset, int64_t first_index, int64_t n, T* z) {
  constexpr int64_t kBlocks = kTile / 4;
  const uint64_t first_block = static_cast<uint64_t>(first_index) / 4;
  const int64_t blocks = (n + 3) / 4;
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
  (void)blocks;
  for (int64_t k = 0; k < n; ++k) z[k] = static_cast<T>(out[k]);
}

// Dispatches a runtime bool to a compile-time one, so inner loops carry no branches.
template <typename Fn>
void with_flag(bool flag, const Fn& fn) {
  if (flag) fn(std::true_type{}); else fn(std::false_type{});
}

// ------------------------------------------------------------------------------ sample_
template <typename scalar_t, typename opmath_t, bool kLoadMean>
void sample_chunk(scalar_t* __restrict__ p, opmath_t* __restrict__ w, const opmath_t* __restrict__ s,
                  const opmath_t* __restrict__ xi_given, int64_t begin, int64_t end, int64_t base,
                  opmath_t n_data, uint64_t seed, uint64_t offset) {
  alignas(64) opmath_t z[kTile];
  for (int64_t j = begin; j < end; j += kTile) {
    const int64_t n = std::min(kTile, end - j);
    const opmath_t* xi = z;
    if (xi_given) {
      xi = xi_given + j;
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

void sample_cpu(at::TensorList params, at::TensorList means, at::TensorList precisions,
                at::IntArrayRef bases, double num_data, int64_t seed, int64_t offset,
                bool load_mean, std::optional<at::TensorList> noise,
                const std::optional<at::Tensor>& offset_tensor, std::optional<int64_t> /*table_key*/) {
  check_sample_args(params, means, precisions, bases, noise, offset_tensor, at::kCPU);
  if (params.empty()) return;
  if (offset_tensor) offset = offset_tensor->item<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_sample", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t n_data = static_cast<opmath_t>(num_data);
    with_flag(load_mean, [&](auto kLoadMean) {
      parallel_chunks(params, [&](const Chunk& c) {
        sample_chunk<scalar_t, opmath_t, decltype(kLoadMean)::value>(
            ptr<scalar_t>(params[c.tensor]), ptr<opmath_t>(means[c.tensor]),
            ptr<opmath_t>(precisions[c.tensor]), noise ? ptr<opmath_t>((*noise)[c.tensor]) : nullptr,
            c.begin, c.end, bases[c.tensor], n_data, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
        return false;
      });
    });
  });
}

// ------------------------------------------------------------------------------ perturb_
template <typename scalar_t, typename opmath_t, bool kFirstPart>
bool perturb_chunk(scalar_t* __restrict__ p, const scalar_t* __restrict__ grad, const opmath_t* __restrict__ w,
                   const opmath_t* __restrict__ s, opmath_t* __restrict__ u, int64_t begin, int64_t end,
                   opmath_t rho, opmath_t inv_scale) {
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

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList means,
                 at::TensorList precisions, at::TensorList u_sums, double rho,
                 const std::optional<at::Tensor>& inv_scale, bool first_part, const at::Tensor& found_inf,
                 const std::optional<at::Tensor>& rho_tensor, std::optional<int64_t> /*table_key*/) {
  check_perturb_args(params, grads, means, precisions, u_sums, inv_scale, found_inf, rho_tensor, at::kCPU);
  if (params.empty()) return;
  if (rho_tensor) rho = rho_tensor->item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_perturb", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // Unscaled gradients are multiplied by exactly 1, which changes no bit.
    const opmath_t inv = inv_scale ? static_cast<opmath_t>(inv_scale->item<float>()) : opmath_t(1);
    with_flag(first_part, [&](auto kFirstPart) {
      raise_flag(found_inf, parallel_chunks(params, [&](const Chunk& c) {
        return perturb_chunk<scalar_t, opmath_t, decltype(kFirstPart)::value>(
            ptr<scalar_t>(params[c.tensor]), ptr<scalar_t>(grads[c.tensor]), ptr<opmath_t>(means[c.tensor]),
            ptr<opmath_t>(precisions[c.tensor]), ptr<opmath_t>(u_sums[c.tensor]), c.begin, c.end,
            static_cast<opmath_t>(rho), inv);
      }));
    });
  });
}

// ------------------------------------------------------------------------------ check_finite_
void check_finite_cpu(at::TensorList tensors, const at::Tensor& found_inf,
                      std::optional<at::TensorList> like) {
  check_finite_args(tensors, like, at::kCPU);
  if (tensors.empty()) return;
  check_found_inf(found_inf, at::kCPU, tensors[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "bsam_check_finite", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    raise_flag(found_inf, parallel_chunks(tensors, [&](const Chunk& c) {
      const scalar_t* __restrict__ x = ptr<scalar_t>(tensors[c.tensor]);
      uint32_t bad = 0;
      for (int64_t j = c.begin; j < c.end; ++j) bad |= non_finite(static_cast<opmath_t>(x[j]));
      return bad != 0;
    }));
  });
}

// ------------------------------------------------------------------------------ update_
template <typename scalar_t, typename opmath_t, bool kWriteMean>
void update_chunk(scalar_t* __restrict__ p, opmath_t* __restrict__ w, opmath_t* __restrict__ gm,
                  opmath_t* __restrict__ s, const scalar_t* __restrict__ grad, const opmath_t* __restrict__ u,
                  int64_t begin, int64_t end, opmath_t grad_factor, opmath_t u_factor,
                  const UpdateCoefficients<opmath_t>& coef) {
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

void update_cpu(at::TensorList params, at::TensorList means, at::TensorList momenta,
                at::TensorList precisions, at::TensorList grads, at::TensorList u_sums,
                const std::optional<at::Tensor>& grad_factor_tensor, double grad_factor,
                double u_factor, double lr, double beta1, double beta2, double weight_decay,
                double damping, bool write_mean, const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& skip_if, std::optional<int64_t> /*table_key*/) {
  check_update_args(params, means, momenta, precisions, grads, u_sums, grad_factor_tensor, lr_tensor,
                    skip_if, at::kCPU);
  if (params.empty()) return;
  if (skip_if && skip_if->item<double>() != 0.0) {
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(means[i]);
    return;
  }
  if (lr_tensor) lr = lr_tensor->item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_update", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t factor = static_cast<opmath_t>(
        grad_factor_tensor ? grad_factor_tensor->item<double>() : grad_factor);
    const UpdateCoefficients<opmath_t> coef{
        static_cast<opmath_t>(lr), static_cast<opmath_t>(beta1), static_cast<opmath_t>(1.0 - beta1),
        static_cast<opmath_t>(beta2), static_cast<opmath_t>(1.0 - beta2),
        static_cast<opmath_t>(weight_decay), static_cast<opmath_t>(damping)};
    with_flag(write_mean, [&](auto kWriteMean) {
      parallel_chunks(params, [&](const Chunk& c) {
        update_chunk<scalar_t, opmath_t, decltype(kWriteMean)::value>(
            ptr<scalar_t>(params[c.tensor]), ptr<opmath_t>(means[c.tensor]), ptr<opmath_t>(momenta[c.tensor]),
            ptr<opmath_t>(precisions[c.tensor]), ptr<scalar_t>(grads[c.tensor]), ptr<opmath_t>(u_sums[c.tensor]),
            c.begin, c.end, factor, static_cast<opmath_t>(u_factor), coef);
        return false;
      });
    });
  });
}

// ------------------------------------------------------------------------------ normal_
void normal_cpu(at::TensorList out, at::IntArrayRef bases, int64_t seed, int64_t offset) {
  check_same_device_contiguous(out, "out", at::kCPU);
  check_same_dtype(out, at::kFloat, "out");
  check_bases(bases, out.size());
  parallel_chunks(out, [&](const Chunk& c) {
    float* z = ptr<float>(out[c.tensor]);
    for (int64_t j = c.begin; j < c.end; j += kTile) {
      stream_tile(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), bases[c.tensor] + j,
                  std::min(kTile, c.end - j), z + j);
    }
    return false;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bsam_fast, CPU, m) {
  m.impl("sample_", &sample_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("check_finite_", &check_finite_cpu);
  m.impl("update_", &update_cpu);
  m.impl("normal_", &normal_cpu);
}

}  // namespace bsam

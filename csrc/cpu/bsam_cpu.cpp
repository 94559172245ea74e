// bsam_cpu.cpp -- CPU implementations of the bsam_fast ops (schemas in csrc/ops.cpp).
//
// Each op checks all of its arguments, then makes one pass over all tensors of its list:
// the tensors are cut into chunks of kChunk elements, and at::parallel_for spreads the
// chunks over threads. The loop over one chunk comes from the table of kernels built for
// this processor's instruction set (kernels.h, kernels.cpp); this file is built for the
// baseline and holds no arithmetic of its own.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace bsam {

// The copies of kernels.cpp in this build (each in its inline namespace, see kernels.h).
inline namespace DEFAULT { extern const ChunkKernels chunk_kernels; }
#ifdef BSAM_CPU_DISPATCH
inline namespace AVX2 { extern const ChunkKernels chunk_kernels; }
inline namespace AVX512 { extern const ChunkKernels chunk_kernels; }

namespace {
// What each copy's flags (setup.py, CMakeLists.txt) let the compiler use. ATen takes
// ATEN_CPU_CAPABILITY as it is given, even above what the processor has; we do not.
bool processor_runs_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool processor_runs_avx512() {
  return processor_runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
}  // namespace
#endif

const ChunkKernels& cpu_kernels() {
  static const ChunkKernels& chosen = []() -> const ChunkKernels& {
#ifdef BSAM_CPU_DISPATCH
    // ATen's own choice (the best set the processor has, or ATEN_CPU_CAPABILITY), as far
    // as the processor has it.
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && processor_runs_avx512()) return bsam::AVX512::chunk_kernels;
    if ((capability == "AVX512" || capability == "AVX2") && processor_runs_avx2()) return bsam::AVX2::chunk_kernels;
#endif
    return bsam::DEFAULT::chunk_kernels;
  }();
  return chosen;
}

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task (a multiple of 256, kernels.cpp's tile)

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

void sample_cpu(at::TensorList params, at::TensorList means, at::TensorList precisions,
                at::IntArrayRef bases, double num_data, int64_t seed, int64_t offset,
                bool load_mean, std::optional<at::TensorList> noise,
                const std::optional<at::Tensor>& offset_tensor, std::optional<int64_t> /*table_key*/) {
  check_sample_args(params, means, precisions, bases, noise, offset_tensor, at::kCPU);
  if (params.empty()) return;
  if (offset_tensor) offset = offset_tensor->item<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_sample", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto kernel = cpu_kernels().of<scalar_t>().sample[load_mean];
    parallel_chunks(params, [&](const Chunk& c) {
      kernel(ptr<scalar_t>(params[c.tensor]), ptr<opmath_t>(means[c.tensor]), ptr<opmath_t>(precisions[c.tensor]),
             noise ? ptr<opmath_t>((*noise)[c.tensor]) : nullptr, c.begin, c.end, bases[c.tensor], num_data,
             static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
      return false;
    });
  });
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList means,
                 at::TensorList precisions, at::TensorList u_sums, double rho,
                 const std::optional<at::Tensor>& inv_scale, bool first_part, const at::Tensor& found_inf,
                 const std::optional<at::Tensor>& rho_tensor, std::optional<int64_t> /*table_key*/) {
  check_perturb_args(params, grads, means, precisions, u_sums, inv_scale, found_inf, rho_tensor, at::kCPU);
  if (params.empty()) return;
  if (rho_tensor) rho = rho_tensor->item<double>();
  // Unscaled gradients are multiplied by exactly 1, which changes no bit.
  const double inv = inv_scale ? static_cast<double>(inv_scale->item<float>()) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_perturb", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto kernel = cpu_kernels().of<scalar_t>().perturb[first_part];
    raise_flag(found_inf, parallel_chunks(params, [&](const Chunk& c) {
      return kernel(ptr<scalar_t>(params[c.tensor]), ptr<scalar_t>(grads[c.tensor]), ptr<opmath_t>(means[c.tensor]),
                    ptr<opmath_t>(precisions[c.tensor]), ptr<opmath_t>(u_sums[c.tensor]), c.begin, c.end, rho, inv);
    }));
  });
}

void check_finite_cpu(at::TensorList tensors, const at::Tensor& found_inf,
                      std::optional<at::TensorList> like) {
  check_finite_args(tensors, like, at::kCPU);
  if (tensors.empty()) return;
  check_found_inf(found_inf, at::kCPU, tensors[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "bsam_check_finite", [&] {
    const auto kernel = cpu_kernels().of<scalar_t>().check_finite;
    raise_flag(found_inf, parallel_chunks(tensors, [&](const Chunk& c) {
      return kernel(ptr<scalar_t>(tensors[c.tensor]), c.begin, c.end);
    }));
  });
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
  const UpdateScalars k{grad_factor_tensor ? grad_factor_tensor->item<double>() : grad_factor, u_factor,
                        lr_tensor ? lr_tensor->item<double>() : lr, beta1, beta2, weight_decay, damping};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_update", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto kernel = cpu_kernels().of<scalar_t>().update[write_mean];
    parallel_chunks(params, [&](const Chunk& c) {
      kernel(ptr<scalar_t>(params[c.tensor]), ptr<opmath_t>(means[c.tensor]), ptr<opmath_t>(momenta[c.tensor]),
             ptr<opmath_t>(precisions[c.tensor]), ptr<scalar_t>(grads[c.tensor]), ptr<opmath_t>(u_sums[c.tensor]),
             c.begin, c.end, k);
      return false;
    });
  });
}

void normal_cpu(at::TensorList out, at::IntArrayRef bases, int64_t seed, int64_t offset) {
  check_same_device_contiguous(out, "out", at::kCPU);
  check_same_dtype(out, at::kFloat, "out");
  check_bases(bases, out.size());
  const auto kernel = cpu_kernels().normal;
  parallel_chunks(out, [&](const Chunk& c) {
    kernel(ptr<float>(out[c.tensor]), c.begin, c.end, bases[c.tensor], static_cast<uint64_t>(seed),
           static_cast<uint64_t>(offset));
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

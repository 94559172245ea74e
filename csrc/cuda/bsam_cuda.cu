// bsam_cuda.cu -- CUDA kernels of the bsam_fast ops (schemas in csrc/ops.cpp).
//
// Multi-tensor launches: the tensor lists of a phase travel as one kernel argument
// (TensorListArgs: pointers, sizes, noise bases and the first chunk of each tensor, up
// to kMaxTensors tensors, under the 32 KB argument limit of CUDA >= 12.1 on sm_70+), so a
// phase is one launch for a ResNet-sized list (more only past kMaxTensors tensors).
// Blocks walk the list's fixed-size chunks (grid-stride); a block finds its tensor by
// binary search over the chunk starts. Each thread handles 4 consecutive elements at a
// time -- exactly one Philox block of noise -- with 16-byte loads/stores when aligned
// (fp32) and scalar accesses otherwise; indices are 64-bit. Arithmetic is in opmath
// (fp32 for bf16/fp16) with the per-element functions of bsam_math.h, built with
// --fmad=false so that the noise equals the CPU kernels' and NumPy's.
//
// Everything a captured CUDA graph must see change between replays is read on the device:
// the noise counter (offset_tensor), the learning rate (lr_tensor), GradScaler's inverse
// scale, and the skip flag of a step whose gradients hold inf/NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../bsam_math.h"
#include "../checks.h"

namespace bsam {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * 4 * kThreads;  // elements per chunk: 16 rounds of 4 per thread
constexpr int kMaxTensors = 320;

template <int Depth>
struct TensorListArgs {
  void* ptr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t base[kMaxTensors];              // start of each tensor in the noise stream
  int64_t chunk_start[kMaxTensors + 1];   // first chunk of each tensor in this launch
  int ntensors;
};
static_assert(sizeof(TensorListArgs<6>) <= 32764, "kernel argument exceeds CUDA's 32 KB limit");

// Calls launch(args, chunks) for each group of at most kMaxTensors non-empty tensors.
template <int Depth, typename Launch>
void for_each_launch(const std::array<at::TensorList, Depth>& lists, const int64_t* bases, const Launch& launch) {
  TensorListArgs<Depth> args;
  int n = 0;
  int64_t chunks = 0;
  auto flush = [&] {
    if (n == 0) return;
    args.ntensors = n;
    args.chunk_start[n] = chunks;
    launch(args, chunks);
    n = 0;
    chunks = 0;
  };
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < Depth; ++d) args.ptr[d][n] = lists[d][t].data_ptr();
    args.numel[n] = numel;
    args.base[n] = bases ? bases[t] : 0;
    args.chunk_start[n] = chunks;
    chunks += (numel + kChunk - 1) / kChunk;
    if (++n == kMaxTensors) flush();
  }
  flush();
}

int grid_for(int64_t chunks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sms) * 16));
}

// The tensor of a chunk (binary search over chunk_start) and the chunk's element range.
template <int Depth>
__device__ __forceinline__ int locate(const TensorListArgs<Depth>& a, int64_t chunk, int64_t& begin, int64_t& end) {
  int lo = 0, hi = a.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  begin = (chunk - a.chunk_start[lo]) * kChunk;
  end = begin + kChunk < a.numel[lo] ? begin + kChunk : a.numel[lo];
  return lo;
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Loads n <= 4 elements at p[i..]: one vector access when all 4 are there and aligned.
template <typename T, typename U>
__device__ __forceinline__ void load4(const T* p, int64_t i, int n, U out[4]) {
  if (n == 4 && reinterpret_cast<uintptr_t>(p + i) % sizeof(Vec4<T>) == 0) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = static_cast<U>(x.v[k]);
  } else {
    for (int k = 0; k < n; ++k) out[k] = static_cast<U>(p[i + k]);
  }
}

template <typename T, typename U>
__device__ __forceinline__ void store4(T* p, int64_t i, int n, const U in[4]) {
  if (n == 4 && reinterpret_cast<uintptr_t>(p + i) % sizeof(Vec4<T>) == 0) {
    Vec4<T> x;
#pragma unroll
    for (int k = 0; k < 4; ++k) x.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Vec4<T>*>(p + i) = x;
  } else {
    for (int k = 0; k < n; ++k) p[i + k] = static_cast<T>(in[k]);
  }
}

// Runs body(t, i, n) for every group of 4 elements of every chunk this block owns.
template <int Depth, typename Body>
__device__ __forceinline__ void for_each_quad(const TensorListArgs<Depth>& a, const Body& body) {
  const int64_t chunks = a.chunk_start[a.ntensors];
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    int64_t begin, end;
    const int t = locate(a, chunk, begin, end);
    for (int64_t i = begin + 4 * static_cast<int64_t>(threadIdx.x); i < end; i += 4 * kThreads) {
      body(t, i, end - i < 4 ? static_cast<int>(end - i) : 4);
    }
  }
}

__device__ __forceinline__ void raise_flag_block(bool bad, float* found_inf) {
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

// ------------------------------------------------------------------------------ kernels
template <typename scalar_t, typename opmath_t, bool kLoadMean, bool kGivenNoise>
__global__ void __launch_bounds__(kThreads) sample_kernel(TensorListArgs<4> a, opmath_t num_data, uint64_t seed,
                                                          uint64_t offset, const int64_t* offset_ptr) {
  const uint64_t draw = offset_ptr ? static_cast<uint64_t>(*offset_ptr) : offset;
  for_each_quad(a, [&](int t, int64_t i, int n) {
    auto* p = static_cast<scalar_t*>(a.ptr[0][t]);
    auto* w = static_cast<opmath_t*>(a.ptr[1][t]);
    const auto* s = static_cast<const opmath_t*>(a.ptr[2][t]);
    opmath_t xi[4], mean[4], prec[4], out[4];
    if constexpr (kGivenNoise) {
      load4(static_cast<const opmath_t*>(a.ptr[3][t]), i, n, xi);
    } else {
      float z[4];
      normal4(seed, draw, static_cast<uint64_t>(a.base[t] + i) / 4, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) xi[k] = static_cast<opmath_t>(z[k]);
    }
    if constexpr (kLoadMean) {
      load4(p, i, n, mean);
      store4(w, i, n, mean);
    } else {
      load4(w, i, n, mean);
    }
    load4(s, i, n, prec);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = noisy_point(mean[k], prec[k], xi[k], num_data);
    store4(p, i, n, out);
  });
}

template <typename scalar_t, typename opmath_t, bool kFirstPart>
__global__ void __launch_bounds__(kThreads) perturb_kernel(TensorListArgs<5> a, opmath_t rho, const double* rho_ptr,
                                                           const float* inv_scale, float* found_inf) {
  const opmath_t inv = inv_scale ? static_cast<opmath_t>(*inv_scale) : opmath_t(1);
  if (rho_ptr) rho = static_cast<opmath_t>(*rho_ptr);
  bool bad = false;
  for_each_quad(a, [&](int t, int64_t i, int n) {
    opmath_t g[4], w[4], s[4], u[4], out[4];
    load4(static_cast<const scalar_t*>(a.ptr[1][t]), i, n, g);
    load4(static_cast<const opmath_t*>(a.ptr[2][t]), i, n, w);
    load4(static_cast<const opmath_t*>(a.ptr[3][t]), i, n, s);
    auto* u_sum = static_cast<opmath_t*>(a.ptr[4][t]);
    if constexpr (!kFirstPart) load4(u_sum, i, n, u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      g[k] = g[k] * inv;
      if (k < n) bad |= non_finite(g[k]);
      const opmath_t magnitude = gradient_magnitude(s[k], g[k]);
      u[k] = kFirstPart ? magnitude : u[k] + magnitude;
      out[k] = perturbed_point(w[k], s[k], g[k], rho);
    }
    store4(u_sum, i, n, u);
    store4(static_cast<scalar_t*>(a.ptr[0][t]), i, n, out);
  });
  raise_flag_block(bad, found_inf);
}

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kThreads) check_finite_kernel(TensorListArgs<1> a, float* found_inf) {
  bool bad = false;
  for_each_quad(a, [&](int t, int64_t i, int n) {
    opmath_t x[4];
    load4(static_cast<const scalar_t*>(a.ptr[0][t]), i, n, x);
    for (int k = 0; k < n; ++k) bad |= non_finite(x[k]);
  });
  raise_flag_block(bad, found_inf);
}

template <typename scalar_t, typename opmath_t, bool kWriteMean>
__global__ void __launch_bounds__(kThreads) update_kernel(TensorListArgs<6> a, UpdateCoefficients<opmath_t> coef,
                                                          opmath_t grad_factor, opmath_t u_factor,
                                                          const float* grad_factor_ptr, const double* lr_ptr,
                                                          const float* skip_if) {
  const bool skip = skip_if != nullptr && *skip_if != 0.0f;
  if (lr_ptr) coef.lr = static_cast<opmath_t>(*lr_ptr);
  if (grad_factor_ptr) grad_factor = static_cast<opmath_t>(*grad_factor_ptr);
  for_each_quad(a, [&](int t, int64_t i, int n) {
    auto* p = static_cast<scalar_t*>(a.ptr[0][t]);
    auto* w_ptr = static_cast<opmath_t*>(a.ptr[1][t]);
    opmath_t w[4];
    load4(w_ptr, i, n, w);
    if (skip) {  // a skipped step: the mean goes back, nothing else is written
      store4(p, i, n, w);
      return;
    }
    auto* gm_ptr = static_cast<opmath_t*>(a.ptr[2][t]);
    auto* s_ptr = static_cast<opmath_t*>(a.ptr[3][t]);
    opmath_t gm[4], s[4], g[4], u[4];
    load4(gm_ptr, i, n, gm);
    load4(s_ptr, i, n, s);
    load4(static_cast<const scalar_t*>(a.ptr[4][t]), i, n, g);
    load4(static_cast<const opmath_t*>(a.ptr[5][t]), i, n, u);
#pragma unroll
    for (int k = 0; k < 4; ++k) posterior_update(w[k], gm[k], s[k], g[k] * grad_factor, u[k] * u_factor, coef);
    store4(gm_ptr, i, n, gm);
    store4(s_ptr, i, n, s);
    if constexpr (kWriteMean) store4(w_ptr, i, n, w);
    store4(p, i, n, w);
  });
}

__global__ void __launch_bounds__(kThreads) normal_kernel(TensorListArgs<1> a, uint64_t seed, uint64_t offset) {
  for_each_quad(a, [&](int t, int64_t i, int n) {
    float z[4];
    normal4(seed, offset, static_cast<uint64_t>(a.base[t] + i) / 4, z);
    store4(static_cast<float*>(a.ptr[0][t]), i, n, z);
  });
}

// ------------------------------------------------------------------------------ host code
template <typename Fn>
void with_flag(bool flag, const Fn& fn) {
  if (flag) fn(std::true_type{}); else fn(std::false_type{});
}

const float* float_ptr_or_null(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t) return nullptr;
  holder = t->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

void sample_cuda(at::TensorList params, at::TensorList means, at::TensorList precisions, at::IntArrayRef bases,
                 double num_data, int64_t seed, int64_t offset, bool load_mean,
                 std::optional<at::TensorList> noise, const std::optional<at::Tensor>& offset_tensor) {
  check_sample_args(params, means, precisions, bases, noise, offset_tensor, at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* offset_ptr = offset_tensor ? offset_tensor->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_sample_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::TensorList xi = noise ? *noise : means;  // a placeholder list when no noise is given
    with_flag(load_mean, [&](auto kLoadMean) {
      with_flag(noise.has_value(), [&](auto kGiven) {
        for_each_launch<4>({params, means, precisions, xi}, bases.data(), [&](const TensorListArgs<4>& a, int64_t chunks) {
          sample_kernel<scalar_t, opmath_t, decltype(kLoadMean)::value, decltype(kGiven)::value>
              <<<grid_for(chunks), kThreads, 0, stream>>>(a, static_cast<opmath_t>(num_data), static_cast<uint64_t>(seed),
                                                         static_cast<uint64_t>(offset), offset_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                  at::TensorList u_sums, double rho, const std::optional<at::Tensor>& inv_scale, bool first_part,
                  const at::Tensor& found_inf, const std::optional<at::Tensor>& rho_tensor) {
  check_perturb_args(params, grads, means, precisions, u_sums, inv_scale, found_inf, rho_tensor, at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor holder, rho_holder;
  const float* inv = float_ptr_or_null(inv_scale, holder);
  const double* rho_ptr = nullptr;
  if (rho_tensor) {
    rho_holder = rho_tensor->to(at::kDouble).contiguous();
    rho_ptr = rho_holder.data_ptr<double>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_perturb_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_flag(first_part, [&](auto kFirst) {
      for_each_launch<5>({params, grads, means, precisions, u_sums}, nullptr, [&](const TensorListArgs<5>& a, int64_t chunks) {
        perturb_kernel<scalar_t, opmath_t, decltype(kFirst)::value><<<grid_for(chunks), kThreads, 0, stream>>>(
            a, static_cast<opmath_t>(rho), rho_ptr, inv, found_inf.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void check_finite_cuda(at::TensorList tensors, const at::Tensor& found_inf) {
  check_params(tensors, at::kCUDA, "tensors");
  if (tensors.empty()) return;
  check_found_inf(found_inf, at::kCUDA, tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "bsam_check_finite_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    for_each_launch<1>({tensors}, nullptr, [&](const TensorListArgs<1>& a, int64_t chunks) {
      check_finite_kernel<scalar_t, opmath_t><<<grid_for(chunks), kThreads, 0, stream>>>(a, found_inf.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void update_cuda(at::TensorList params, at::TensorList means, at::TensorList momenta, at::TensorList precisions,
                 at::TensorList grads, at::TensorList u_sums, const std::optional<at::Tensor>& grad_factor_tensor,
                 double grad_factor, double u_factor, double lr, double beta1, double beta2, double weight_decay,
                 double damping, bool write_mean, const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& skip_if) {
  check_update_args(params, means, momenta, precisions, grads, u_sums, grad_factor_tensor, lr_tensor, skip_if,
                    at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor factor_holder, skip_holder, lr_holder;
  const float* factor_ptr = float_ptr_or_null(grad_factor_tensor, factor_holder);
  const float* skip_ptr = float_ptr_or_null(skip_if, skip_holder);
  const double* lr_ptr = nullptr;
  if (lr_tensor) {
    lr_holder = lr_tensor->to(at::kDouble).contiguous();
    lr_ptr = lr_holder.data_ptr<double>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_update_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const UpdateCoefficients<opmath_t> coef{
        static_cast<opmath_t>(lr), static_cast<opmath_t>(beta1), static_cast<opmath_t>(1.0 - beta1),
        static_cast<opmath_t>(beta2), static_cast<opmath_t>(1.0 - beta2),
        static_cast<opmath_t>(weight_decay), static_cast<opmath_t>(damping)};
    with_flag(write_mean, [&](auto kWriteMean) {
      for_each_launch<6>({params, means, momenta, precisions, grads, u_sums}, nullptr,
                         [&](const TensorListArgs<6>& a, int64_t chunks) {
        update_kernel<scalar_t, opmath_t, decltype(kWriteMean)::value><<<grid_for(chunks), kThreads, 0, stream>>>(
            a, coef, static_cast<opmath_t>(grad_factor), static_cast<opmath_t>(u_factor), factor_ptr, lr_ptr, skip_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void normal_cuda(at::TensorList out, at::IntArrayRef bases, int64_t seed, int64_t offset) {
  check_same_device_contiguous(out, "out", at::kCUDA);
  check_same_dtype(out, at::kFloat, "out");
  check_bases(bases, out.size());
  if (out.empty()) return;
  const c10::cuda::CUDAGuard guard(out[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  for_each_launch<1>({out}, bases.data(), [&](const TensorListArgs<1>& a, int64_t chunks) {
    normal_kernel<<<grid_for(chunks), kThreads, 0, stream>>>(a, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bsam_fast, CUDA, m) {
  m.impl("sample_", &sample_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("check_finite_", &check_finite_cuda);
  m.impl("update_", &update_cuda);
  m.impl("normal_", &normal_cuda);
}

}  // namespace bsam

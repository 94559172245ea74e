// bsam_cuda.cu -- CUDA kernels of the bsam_fast ops (schemas in csrc/ops.cpp).
//
// One generic multi-tensor kernel runs a quad functor (quads.h) over a packed list of
// tensors (multi_tensor.h); launch_ops.h packs the lists and picks the functor for each op
// and dtype. Those three headers are host-and-device code, run on the CPU by the launch
// emulation under ctest (csrc/tests/test_cuda_emulation.cpp); this file adds what only a
// GPU has: the kernel, the launch on the current stream, device guards and input checks.
//
// Arithmetic is in opmath (fp32 for bf16/fp16) with the per-element functions of
// bsam_math.h, built with --fmad=false so that the noise and the updates equal the CPU
// kernels' and NumPy's. Everything a captured CUDA graph must see change between replays
// is read on the device: the noise counter, lr, rho, GradScaler's inverse scale, and the
// skip flag of a step whose gradients hold inf or NaN.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>

#include "../checks.h"
#include "launch_ops.h"

namespace bsam {
namespace {

// Block b of the grid runs thread x's share of the quads for x = threadIdx.x; the inf/NaN
// flags of a block are ORed with one barrier and written once.
template <int Depth, typename Body>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorListArgs<Depth> a, Body body,
                                                                float* found_inf) {
  body.read_device_scalars();
  const bool bad = for_each_quad(a, blockIdx.x, gridDim.x, static_cast<int>(threadIdx.x), body);
  if constexpr (Body::kFlagsNonFinite) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  }
}

// The current device's multiprocessor count, queried once per device.
int multiprocessors() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> counts{};  // 0: not read yet
  const c10::DeviceIndex device = c10::cuda::current_device();
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    n = at::cuda::getDeviceProperties(device)->multiProcessorCount;
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

int grid_for(int64_t chunks) {
  return static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(multiprocessors()) * 16));
}

// The `launch` of launch_ops.h: one kernel per packed list, on the current stream.
struct CudaLaunch {
  cudaStream_t stream;

  template <int Depth, typename Body>
  void operator()(const TensorListArgs<Depth>& a, int64_t chunks, const Body& body, float* found_inf) const {
    multi_tensor_kernel<Depth, Body><<<grid_for(chunks), kThreads, 0, stream>>>(a, body, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLaunch current_stream_launch() { return CudaLaunch{at::cuda::getCurrentCUDAStream()}; }

void sample_cuda(at::TensorList params, at::TensorList means, at::TensorList precisions, at::IntArrayRef bases,
                 double num_data, int64_t seed, int64_t offset, bool load_mean,
                 std::optional<at::TensorList> noise, const std::optional<at::Tensor>& offset_tensor,
                 std::optional<int64_t> table_key) {
  check_sample_args(params, means, precisions, bases, noise, offset_tensor, at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch_sample(current_stream_launch(), params, means, precisions, bases, num_data, seed, offset, load_mean, noise,
                offset_tensor, table_key);
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                  at::TensorList u_sums, double rho, const std::optional<at::Tensor>& inv_scale, bool first_part,
                  const at::Tensor& found_inf, const std::optional<at::Tensor>& rho_tensor,
                  std::optional<int64_t> table_key) {
  check_perturb_args(params, grads, means, precisions, u_sums, inv_scale, found_inf, rho_tensor, at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch_perturb(current_stream_launch(), params, grads, means, precisions, u_sums, rho, inv_scale, first_part,
                 found_inf, rho_tensor, table_key);
}

void check_finite_cuda(at::TensorList tensors, const at::Tensor& found_inf,
                       std::optional<at::TensorList> like) {
  check_finite_args(tensors, like, at::kCUDA);
  if (tensors.empty()) return;
  check_found_inf(found_inf, at::kCUDA, tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  launch_check_finite(current_stream_launch(), tensors, found_inf);
}

void update_cuda(at::TensorList params, at::TensorList means, at::TensorList momenta, at::TensorList precisions,
                 at::TensorList grads, at::TensorList u_sums, const std::optional<at::Tensor>& grad_factor_tensor,
                 double grad_factor, double u_factor, double lr, double beta1, double beta2, double weight_decay,
                 double damping, bool write_mean, const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& skip_if, std::optional<int64_t> table_key) {
  check_update_args(params, means, momenta, precisions, grads, u_sums, grad_factor_tensor, lr_tensor, skip_if,
                    at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch_update(current_stream_launch(), params, means, momenta, precisions, grads, u_sums, grad_factor_tensor,
                grad_factor, u_factor, lr, beta1, beta2, weight_decay, damping, write_mean, lr_tensor, skip_if,
                table_key);
}

void normal_cuda(at::TensorList out, at::IntArrayRef bases, int64_t seed, int64_t offset) {
  check_same_device_contiguous(out, "out", at::kCUDA);
  check_same_dtype(out, at::kFloat, "out");
  check_bases(bases, out.size());
  if (out.empty()) return;
  const c10::cuda::CUDAGuard guard(out[0].device());
  launch_normal(current_stream_launch(), out, bases, seed, offset);
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

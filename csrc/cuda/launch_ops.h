// launch_ops.h -- the host side of each CUDA op after its argument checks: dtype dispatch,
// packing of the tensor lists into launches (multi_tensor.h) and the quad functor
// (quads.h) each launch runs. Templated on `launch`, a callable
//
//   launch(const TensorListArgs<Depth>& args, int64_t chunks, const Body& body, float* found_inf)
//
// that bsam_cuda.cu implements with a kernel launch and csrc/tests/test_cuda_emulation.cpp
// with a sequential walk over every (block, thread): one source for both.
//
// Tensor-valued scalars are passed as pointers for the kernels to read: lr, rho and the
// gradient factor as they are (float32 or float64, read as float64 like the CPU kernels
// read them: no conversion per call), a GradScaler's 1/scale and the skip flag as float32.
//
// table_key (sample_, perturb_, update_): the step plan's key of the bucket; its packed
// launches are kept (LaunchCache), checked against the lists of each call, and only the
// gradients' pointers written in.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <type_traits>

#include "multi_tensor.h"
#include "quads.h"

namespace bsam {

// Dispatches a runtime bool to a compile-time one.
template <typename Fn>
void with_flag(bool flag, const Fn& fn) {
  if (flag) fn(std::true_type{}); else fn(std::false_type{});
}

// The packings kept for each op (multi_tensor.h), one cache per op and kind of launch.
template <typename Launch>
LaunchCache<4>& sample_cache() {
  static LaunchCache<4> cache;
  return cache;
}
template <typename Launch>
LaunchCache<5>& perturb_cache() {
  static LaunchCache<5> cache;
  return cache;
}
template <typename Launch>
LaunchCache<6>& update_cache() {
  static LaunchCache<6> cache;
  return cache;
}

// A ScalarRef to an optional one-element tensor: float32 and float64 are read in place;
// another floating dtype is converted into `holder` (a copy: a graph would not see writes).
inline ScalarRef scalar_ref(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t) return {};
  const at::Tensor& src = (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble)
                              ? *t
                              : (holder = t->to(at::kDouble));
  return {src.data_ptr(), src.scalar_type() == at::kDouble};
}

// A pointer to the value of an optional one-element tensor as `dtype` (converted into
// `holder` when needed; a tensor already of that dtype is read in place, so a CUDA graph
// sees later writes to it), or nullptr.
template <typename T>
const T* scalar_ptr_or_null(const std::optional<at::Tensor>& t, at::ScalarType dtype, at::Tensor& holder) {
  if (!t) return nullptr;
  holder = t->to(dtype).contiguous();
  return holder.data_ptr<T>();
}

template <typename Launch>
void launch_sample(const Launch& launch, at::TensorList params, at::TensorList means, at::TensorList precisions,
                   at::IntArrayRef bases, double num_data, int64_t seed, int64_t offset, bool load_mean,
                   const std::optional<at::TensorList>& noise, const std::optional<at::Tensor>& offset_tensor,
                   std::optional<int64_t> table_key = std::nullopt) {
  LaunchCache<4>& cache = sample_cache<Launch>();
  const int64_t* offset_ptr = offset_tensor ? offset_tensor->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_sample_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::TensorList xi = noise ? *noise : means;  // a placeholder list when no noise is given
    with_flag(load_mean, [&](auto kLoadMean) {
      with_flag(noise.has_value(), [&](auto kGiven) {
        using Body = SampleQuad<scalar_t, opmath_t, decltype(kLoadMean)::value, decltype(kGiven)::value>;
        const Body body{static_cast<opmath_t>(num_data), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                        offset_ptr};
        cache.run(table_key, {params, means, precisions, xi}, bases.data(), noise ? 3 : -1,
                  [&](const TensorListArgs<Body::kDepth>& a, int64_t chunks) { launch(a, chunks, body, nullptr); });
      });
    });
  });
}

template <typename Launch>
void launch_perturb(const Launch& launch, at::TensorList params, at::TensorList grads, at::TensorList means,
                    at::TensorList precisions, at::TensorList u_sums, double rho,
                    const std::optional<at::Tensor>& inv_scale, bool first_part, const at::Tensor& found_inf,
                    const std::optional<at::Tensor>& rho_tensor, std::optional<int64_t> table_key = std::nullopt) {
  LaunchCache<5>& cache = perturb_cache<Launch>();
  at::Tensor inv_holder, rho_holder;
  const float* inv_ptr = scalar_ptr_or_null<float>(inv_scale, at::kFloat, inv_holder);
  const ScalarRef rho_ref = scalar_ref(rho_tensor, rho_holder);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_perturb_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_flag(first_part, [&](auto kFirst) {
      using Body = PerturbQuad<scalar_t, opmath_t, decltype(kFirst)::value>;
      const Body body{static_cast<opmath_t>(rho), opmath_t(1), rho_ref, inv_ptr};
      float* found = found_inf.data_ptr<float>();
      cache.run(table_key, {params, grads, means, precisions, u_sums}, nullptr, 1,
                [&](const TensorListArgs<Body::kDepth>& a, int64_t chunks) { launch(a, chunks, body, found); });
    });
  });
}

template <typename Launch>
void launch_check_finite(const Launch& launch, at::TensorList tensors, const at::Tensor& found_inf) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "bsam_check_finite_cuda", [&] {
    using Body = CheckFiniteQuad<scalar_t, at::opmath_type<scalar_t>>;
    for_each_launch<Body::kDepth>({tensors}, nullptr, [&](const TensorListArgs<Body::kDepth>& a, int64_t chunks) {
      launch(a, chunks, Body{}, found_inf.data_ptr<float>());
    });
  });
}

template <typename Launch>
void launch_update(const Launch& launch, at::TensorList params, at::TensorList means, at::TensorList momenta,
                   at::TensorList precisions, at::TensorList grads, at::TensorList u_sums,
                   const std::optional<at::Tensor>& grad_factor_tensor, double grad_factor, double u_factor,
                   double lr, double beta1, double beta2, double weight_decay, double damping, bool write_mean,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& skip_if,
                   std::optional<int64_t> table_key = std::nullopt) {
  LaunchCache<6>& cache = update_cache<Launch>();
  at::Tensor factor_holder, lr_holder, skip_holder;
  const ScalarRef factor_ref = scalar_ref(grad_factor_tensor, factor_holder);
  const ScalarRef lr_ref = scalar_ref(lr_tensor, lr_holder);
  const float* skip_ptr = scalar_ptr_or_null<float>(skip_if, at::kFloat, skip_holder);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "bsam_update_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const UpdateCoefficients<opmath_t> coef{
        static_cast<opmath_t>(lr), static_cast<opmath_t>(beta1), static_cast<opmath_t>(1.0 - beta1),
        static_cast<opmath_t>(beta2), static_cast<opmath_t>(1.0 - beta2),
        static_cast<opmath_t>(weight_decay), static_cast<opmath_t>(damping)};
    with_flag(write_mean, [&](auto kWriteMean) {
      using Body = UpdateQuad<scalar_t, opmath_t, decltype(kWriteMean)::value>;
      const Body body{coef, static_cast<opmath_t>(grad_factor), static_cast<opmath_t>(u_factor),
                      factor_ref, lr_ref, skip_ptr, false};
      cache.run(table_key, {params, means, momenta, precisions, grads, u_sums}, nullptr, 4,
                [&](const TensorListArgs<Body::kDepth>& a, int64_t chunks) { launch(a, chunks, body, nullptr); });
    });
  });
}

template <typename Launch>
void launch_normal(const Launch& launch, at::TensorList out, at::IntArrayRef bases, int64_t seed, int64_t offset) {
  const NormalQuad body{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  for_each_launch<NormalQuad::kDepth>({out}, bases.data(), [&](const TensorListArgs<NormalQuad::kDepth>& a,
                                                                int64_t chunks) {
    launch(a, chunks, body, nullptr);
  });
}

}  // namespace bsam

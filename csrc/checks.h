// checks.h -- argument checks shared by the CPU and CUDA host code. Every op checks all
// of its inputs before it touches memory, and says what it expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <string>

namespace bsam {

inline at::ScalarType opmath_of(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_same_device_contiguous(at::TensorList ts, const char* name, at::DeviceType device) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].device().type() == device, "bsam_fast: ", name, "[", i, "] must be a ",
                c10::DeviceTypeName(device), " tensor, got one on ", ts[i].device());
    TORCH_CHECK(ts[i].device() == ts[0].device(), "bsam_fast: ", name,
                " must all be on one device; ", name, "[0] is on ", ts[0].device(), ", ", name,
                "[", i, "] on ", ts[i].device());
    TORCH_CHECK(ts[i].is_contiguous(), "bsam_fast: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(!ts[i].is_sparse(), "bsam_fast: ", name, "[", i, "] must be dense, got a sparse tensor");
  }
}

inline void check_same_dtype(at::TensorList ts, at::ScalarType dtype, const char* name) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].scalar_type() == dtype, "bsam_fast: ", name, "[", i, "] must have dtype ",
                dtype, ", got ", ts[i].scalar_type());
  }
}

// `other` must match `params` in length, device, shape (numel), and have dtype `dtype`.
inline void check_like(at::TensorList params, at::TensorList other, const char* name,
                       at::ScalarType dtype, at::DeviceType device) {
  TORCH_CHECK(other.size() == params.size(), "bsam_fast: ", name, " must have one tensor per parameter (",
              params.size(), "), got ", other.size());
  check_same_device_contiguous(other, name, device);
  for (size_t i = 0; i < other.size(); ++i) {
    TORCH_CHECK(other[i].device() == params[i].device(), "bsam_fast: ", name, "[", i,
                "] must be on the parameter's device ", params[i].device(), ", got ", other[i].device());
    TORCH_CHECK(other[i].sizes() == params[i].sizes(), "bsam_fast: ", name, "[", i, "] must have shape ",
                params[i].sizes(), " like its parameter, got ", other[i].sizes());
  }
  check_same_dtype(other, dtype, name);
}

inline void check_params(at::TensorList params, at::DeviceType device, const char* name = "params") {
  check_same_device_contiguous(params, name, device);
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "bsam_fast: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  check_same_dtype(params, dtype, name);
}

inline void check_found_inf(const at::Tensor& found_inf, at::DeviceType device, at::Device where) {
  TORCH_CHECK(found_inf.device().type() == device && found_inf.device() == where,
              "bsam_fast: found_inf must be on ", where, ", got ", found_inf.device());
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "bsam_fast: found_inf must be a one-element float32 tensor, got ", found_inf.scalar_type(),
              " with ", found_inf.numel(), " elements");
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name, at::Device where) {
  if (!t) return;
  TORCH_CHECK(t->numel() == 1 && t->is_floating_point(), "bsam_fast: ", name,
              " must be a one-element floating-point tensor, got ", t->numel(), " elements of ", t->scalar_type());
  TORCH_CHECK(t->device() == where, "bsam_fast: ", name, " must be on ", where, ", got ", t->device());
}

inline void check_bases(at::IntArrayRef bases, size_t n) {
  TORCH_CHECK(bases.size() == n, "bsam_fast: bases must have one entry per tensor (", n, "), got ", bases.size());
  for (size_t i = 0; i < bases.size(); ++i) {
    TORCH_CHECK(bases[i] >= 0 && bases[i] % 4 == 0, "bsam_fast: bases[", i,
                "] must be a non-negative multiple of 4, got ", bases[i]);
  }
}

inline void check_sample_args(at::TensorList params, at::TensorList means, at::TensorList precisions,
                              at::IntArrayRef bases, const std::optional<at::TensorList>& noise,
                              const std::optional<at::Tensor>& offset_tensor, at::DeviceType device) {
  check_params(params, device);
  if (params.empty()) return;
  const auto op = opmath_of(params[0].scalar_type());
  check_like(params, means, "means", op, device);
  check_like(params, precisions, "precisions", op, device);
  check_bases(bases, params.size());
  if (noise) check_like(params, *noise, "noise", op, device);
  if (offset_tensor) {
    TORCH_CHECK(offset_tensor->scalar_type() == at::kLong && offset_tensor->numel() == 1,
                "bsam_fast: offset_tensor must be a one-element int64 tensor, got ", offset_tensor->scalar_type(),
                " with ", offset_tensor->numel(), " elements");
    TORCH_CHECK(offset_tensor->device() == params[0].device(), "bsam_fast: offset_tensor must be on ",
                params[0].device(), ", got ", offset_tensor->device());
  }
}

inline void check_perturb_args(at::TensorList params, at::TensorList grads, at::TensorList means,
                               at::TensorList precisions, at::TensorList u_sums,
                               const std::optional<at::Tensor>& inv_scale, const at::Tensor& found_inf,
                               const std::optional<at::Tensor>& rho_tensor, at::DeviceType device) {
  check_params(params, device);
  if (params.empty()) return;
  const auto op = opmath_of(params[0].scalar_type());
  check_like(params, grads, "grads", params[0].scalar_type(), device);
  check_like(params, means, "means", op, device);
  check_like(params, precisions, "precisions", op, device);
  check_like(params, u_sums, "u_sums", op, device);
  check_scalar_tensor(inv_scale, "inv_scale", params[0].device());
  check_scalar_tensor(rho_tensor, "rho_tensor", params[0].device());
  check_found_inf(found_inf, device, params[0].device());
}

// check_finite_: floating tensors of one dtype; with `like` (the parameters), each tensor
// matches its parameter in device, shape and dtype.
inline void check_finite_args(at::TensorList tensors, const std::optional<at::TensorList>& like,
                              at::DeviceType device) {
  if (like) {
    check_params(*like, device, "like");
    check_like(*like, tensors, "grads", like->empty() ? at::kFloat : (*like)[0].scalar_type(), device);
  } else {
    check_params(tensors, device, "tensors");
  }
}

inline void check_update_args(at::TensorList params, at::TensorList means, at::TensorList momenta,
                              at::TensorList precisions, at::TensorList grads, at::TensorList u_sums,
                              const std::optional<at::Tensor>& grad_factor_tensor,
                              const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& skip_if,
                              at::DeviceType device) {
  check_params(params, device);
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto op = opmath_of(dtype);
  check_like(params, means, "means", op, device);
  check_like(params, momenta, "momenta", op, device);
  check_like(params, precisions, "precisions", op, device);
  check_like(params, u_sums, "u_sums", op, device);
  check_like(params, grads, "grads", dtype, device);
  check_scalar_tensor(grad_factor_tensor, "grad_factor_tensor", params[0].device());
  check_scalar_tensor(lr_tensor, "lr_tensor", params[0].device());
  check_scalar_tensor(skip_if, "skip_if", params[0].device());
}

}  // namespace bsam

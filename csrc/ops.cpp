// ops.cpp -- the schemas of every bsam_fast op, in one place.
//
// Each op is one phase of a bSAM step over a whole list of tensors (one device, one
// dtype); mutated arguments are marked (a!). Implementations are registered per dispatch
// key beside their kernels: csrc/cpu/bsam_cpu.cpp (CPU, loops in kernels.cpp), csrc/cuda/bsam_cuda.cu (CUDA).
// The Python wrappers and fake (meta) implementations are in bsam_fast/_ops.py.
#include <torch/library.h>

// table_key (sample_, perturb_, update_): a key the caller keeps for these lists (a step
// plan's bucket); for one key every list but the gradients (sample_: but the noise) holds
// the same tensors at every call, so an implementation may keep what it derived from them
// (the CUDA kernels' packed pointer tables). None: nothing is kept.
TORCH_LIBRARY(bsam_fast, m) {
  // params := means + xi / sqrt(num_data * precisions), xi from the Philox stream
  // (seed, offset, bases[i] + element) or from `noise`. load_mean: first means := params.
  // offset_tensor (one int64 on the params' device), when given, is read in place of
  // `offset` by the kernel itself, so a captured CUDA graph draws fresh noise at replay.
  m.def("sample_(Tensor(a!)[] params, Tensor(b!)[] means, Tensor[] precisions, int[] bases, "
        "float num_data, int seed, int offset, bool load_mean, Tensor[]? noise, "
        "Tensor? offset_tensor=None, int? table_key=None) -> ()");
  // u_sums (+)= sqrt(s) * |g|;  params := means + rho * g / s, with g = grads * inv_scale.
  // found_inf := 1 if a gradient holds inf or NaN. (The caller then drops the gradients.)
  // rho_tensor: a one-element tensor read in place of `rho` (a schedule under CUDA graphs).
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor[] means, Tensor[] precisions, "
        "Tensor(b!)[] u_sums, float rho, Tensor? inv_scale, bool first_part, "
        "Tensor(c!) found_inf, Tensor? rho_tensor=None, int? table_key=None) -> ()");
  // found_inf := 1 if a tensor holds inf or NaN. like (the parameters), when given: each
  // tensor must match its parameter in device, shape and dtype (the gradients of a step,
  // checked before any bucket is updated).
  m.def("check_finite_(Tensor[] tensors, Tensor(a!) found_inf, Tensor[]? like=None) -> ()");
  // Momentum, mean and precision update; params := new mean. g = grads * factor with
  // factor = grad_factor_tensor[0] if given else grad_factor (1/m, times a GradScaler's
  // 1/scale); u = u_sums * u_factor. With m parts, grads hold the sum of the m perturbed
  // gradients (autograd accumulates them, see optimizer.py).
  // write_mean: also store the new mean in `means` (fp32 masters of bf16/fp16 params).
  // lr_tensor: a one-element tensor read in place of `lr` (a schedule under CUDA graphs).
  // skip_if: a one-element float tensor; if it is non-zero the step is skipped on the
  // device (params := means, no state written), with no host synchronisation.
  m.def("update_(Tensor(a!)[] params, Tensor(b!)[] means, Tensor(c!)[] momenta, "
        "Tensor(d!)[] precisions, Tensor[] grads, Tensor[] u_sums, Tensor? grad_factor_tensor, "
        "float grad_factor, float u_factor, float lr, float beta1, float beta2, "
        "float weight_decay, float damping, bool write_mean, Tensor? lr_tensor=None, "
        "Tensor? skip_if=None, int? table_key=None) -> ()");
  // The stream's normals for each tensor (float32), for tests and tools.
  m.def("normal_(Tensor(a!)[] out, int[] bases, int seed, int offset) -> ()");
}

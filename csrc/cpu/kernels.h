// kernels.h -- the CPU kernels' inner loops, one table per instruction set.
//
// csrc/cpu/kernels.cpp holds the loops over one chunk of one tensor. The build compiles it
// once per instruction set (x86-64: baseline, AVX2, AVX-512, each with its own -m flags and
// CPU_CAPABILITY, as ATen compiles its own kernels), and every copy lives in its own inline
// namespace bsam::<CPU_CAPABILITY>, so copies built for different instruction sets never
// merge at link time. bsam_cpu.cpp, built for the baseline, checks the arguments, splits
// the work into chunks and calls the table that cpu_kernels() chose once, at load, from
// ATen's CPU capability (the highest the processor has, or the ATEN_CPU_CAPABILITY
// environment variable). One binary therefore runs on any x86-64 processor and uses
// 512-bit vectors where they exist.
//
// Nothing here depends on the instruction set: the table's layout and the scalar arguments
// are the same in every copy. Every copy rounds alike (-ffp-contract=off, no fast math), so
// all of them give the same bits.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace bsam {

// The update's scalars, as the op received them (each kernel converts to its arithmetic type).
struct UpdateScalars {
  double grad_factor, u_factor, lr, beta1, beta2, weight_decay, damping;
};

// The loops for parameters of one dtype. Each works on elements [begin, end) of one tensor;
// pointers are to the tensor's first element. The boolean template choices of each op are
// indexed by [0/1]: sample[load_mean], perturb[first_part], update[write_mean]. perturb and
// check_finite return true if they met a gradient or value that is inf or NaN.
template <typename scalar_t>
struct ChunkKernelsFor {
  using opmath_t = at::opmath_type<scalar_t>;
  // p := w + xi / sqrt(num_data * s); xi from `noise` (indexed like p) or the Philox stream
  // at global index base + element. load_mean: first w := p.
  void (*sample[2])(scalar_t* p, opmath_t* w, const opmath_t* s, const opmath_t* noise, int64_t begin,
                    int64_t end, int64_t base, double num_data, uint64_t seed, uint64_t offset);
  bool (*perturb[2])(scalar_t* p, const scalar_t* grad, const opmath_t* w, const opmath_t* s, opmath_t* u,
                     int64_t begin, int64_t end, double rho, double inv_scale);
  void (*update[2])(scalar_t* p, opmath_t* w, opmath_t* gm, opmath_t* s, const scalar_t* grad,
                    const opmath_t* u, int64_t begin, int64_t end, const UpdateScalars& k);
  bool (*check_finite)(const scalar_t* x, int64_t begin, int64_t end);
};

struct ChunkKernels {
  const char* name;  // the CPU_CAPABILITY it was built for: "DEFAULT", "AVX2", "AVX512"
  ChunkKernelsFor<float> f32;
  ChunkKernelsFor<double> f64;
  ChunkKernelsFor<c10::Half> f16;
  ChunkKernelsFor<c10::BFloat16> bf16;
  // z[begin, end) := the stream's normals at global indices base + begin, ...
  void (*normal)(float* z, int64_t begin, int64_t end, int64_t base, uint64_t seed, uint64_t offset);

  template <typename scalar_t>
  const ChunkKernelsFor<scalar_t>& of() const {
    if constexpr (std::is_same_v<scalar_t, float>) return f32;
    else if constexpr (std::is_same_v<scalar_t, double>) return f64;
    else if constexpr (std::is_same_v<scalar_t, c10::Half>) return f16;
    else return bf16;
  }
};

// The table for this processor, chosen at the first call (bsam_cpu.cpp).
const ChunkKernels& cpu_kernels();

}  // namespace bsam

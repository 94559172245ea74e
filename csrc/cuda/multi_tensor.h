// multi_tensor.h -- how the CUDA kernels walk a list of tensors, written once for the GPU
// and for a host emulation of the launch (csrc/tests/test_cuda_emulation.cpp), so that the
// plumbing only the GPU runs is tested on any machine.
//
// A launch carries up to kMaxTensors tensors in one kernel argument (TensorListArgs:
// pointers, sizes, noise bases and the first chunk of each tensor, under CUDA's 32 KB
// argument limit on sm_70+ with CUDA >= 12.1). The packing of a step plan's lists is kept
// across steps (LaunchCache): a call compares its lists with it and writes in only the
// gradients' pointers. The tensors are cut into chunks of kChunk
// elements; block b of a grid of G blocks takes chunks b, b + G, ... (grid-stride) and finds
// a chunk's tensor by binary search over the chunk starts. Thread x of a block takes the
// quads (4 consecutive elements: one Philox block of noise) starting at begin + 4x,
// begin + 4x + 4*kThreads, ...; the last quad of a tensor may hold 1-3 elements. Loads and
// stores are one 16-byte (8 for bf16/fp16) vector access when a full quad is aligned,
// scalar accesses otherwise (views with a storage offset, tails). Indices are 64-bit.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "../bsam_math.h"

#if defined(__CUDACC__)
#define BSAM_UNROLL _Pragma("unroll")
#else
#define BSAM_UNROLL
#endif

namespace bsam {

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

// Host: calls launch(args, chunks) for each group of at most kMaxTensors non-empty tensors
// (empty ones are skipped: they own no chunk), packed in one argument on the stack.
// bases: noise base per tensor, or nullptr.
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

// The same launches, packed to be kept: `index` maps each packed tensor back to its
// position in the lists, so that a later call can compare its lists with the packing and
// re-read the one column that changes between calls (the gradients).
template <int Depth>
struct PackedLaunches {
  std::vector<TensorListArgs<Depth>> args;
  std::vector<int64_t> chunks;
  std::vector<std::vector<int32_t>> index;
  std::vector<int64_t> numel;     // of every tensor of the lists, empty ones too
  uint64_t last_use = 0;

  // True if `lists` are the packed tensors (same sizes, same storage in every column but
  // `changing`); then the `changing` column's pointers are written in. One pass, no
  // allocation: the per-call cost of a kept packing.
  bool matches_and_refill(const std::array<at::TensorList, Depth>& lists, int changing) {
    if (lists[0].size() != numel.size()) return false;
    for (size_t t = 0; t < numel.size(); ++t) {
      if (lists[0][t].numel() != numel[t]) return false;
    }
    for (size_t l = 0; l < args.size(); ++l) {
      for (size_t j = 0; j < index[l].size(); ++j) {
        for (int d = 0; d < Depth; ++d) {
          void* ptr = lists[d][index[l][j]].data_ptr();
          if (d == changing) {
            args[l].ptr[d][j] = ptr;
          } else if (args[l].ptr[d][j] != ptr) {
            return false;
          }
        }
      }
    }
    return true;
  }
};

template <int Depth>
PackedLaunches<Depth> pack_launches(const std::array<at::TensorList, Depth>& lists, const int64_t* bases) {
  PackedLaunches<Depth> packed;
  int n = 0;
  int64_t chunks = 0;
  auto flush = [&] {
    if (n == 0) return;
    packed.args.back().ntensors = n;
    packed.args.back().chunk_start[n] = chunks;
    packed.chunks.push_back(chunks);
    n = 0;
    chunks = 0;
  };
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t numel = lists[0][t].numel();
    packed.numel.push_back(numel);
    if (numel == 0) continue;
    if (n == 0) {
      packed.args.emplace_back();
      packed.index.emplace_back();
    }
    TensorListArgs<Depth>& args = packed.args.back();
    for (int d = 0; d < Depth; ++d) args.ptr[d][n] = lists[d][t].data_ptr();
    args.numel[n] = numel;
    args.base[n] = bases ? bases[t] : 0;
    args.chunk_start[n] = chunks;
    packed.index.back().push_back(static_cast<int32_t>(t));
    chunks += (numel + kChunk - 1) / kChunk;
    if (++n == kMaxTensors) flush();
  }
  flush();
  return packed;
}

// Packings kept across calls, by a caller's key (a step plan's bucket, see
// bsam_fast/plan.py). Each call checks that its lists are the packed tensors (sizes and
// the storage of every column but the changing one: the gradients, or -1 for none) and
// packs them again if not, so a key is a hint, never a promise that could go stale; the
// noise bases are the caller's to keep fixed per key. At most kMaxKept packings are held,
// the least recently used dropped first. One cache per op and launch.
template <int Depth>
class LaunchCache {
 public:
  static constexpr size_t kMaxKept = 64;

  // Calls launch(args, chunks) for each launch of `lists`, under the cache's lock (a kept
  // packing is refilled in place; a kernel launch copies its argument).
  template <typename Launch>
  void run(std::optional<int64_t> key, const std::array<at::TensorList, Depth>& lists, const int64_t* bases,
           int changing_column, const Launch& launch) {
    if (!key) {
      for_each_launch<Depth>(lists, bases, launch);
      return;
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    auto it = kept_.find(*key);
    if (it == kept_.end() || !it->second.matches_and_refill(lists, changing_column)) {
      if (it == kept_.end() && kept_.size() >= kMaxKept) {
        kept_.erase(std::min_element(kept_.begin(), kept_.end(), [](const auto& a, const auto& b) {
          return a.second.last_use < b.second.last_use;
        }));
      }
      it = kept_.insert_or_assign(*key, pack_launches<Depth>(lists, bases)).first;
      ++packings_;
    }
    it->second.last_use = ++clock_;
    const PackedLaunches<Depth>& packed = it->second;
    for (size_t l = 0; l < packed.args.size(); ++l) launch(packed.args[l], packed.chunks[l]);
  }

  // How many packings were made (the tests: a kept one is reused, a changed list repacked).
  uint64_t packings() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return packings_;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int64_t, PackedLaunches<Depth>> kept_;
  uint64_t clock_ = 0;
  uint64_t packings_ = 0;
};

// The tensor of a chunk (the last tensor whose first chunk is <= chunk) and the chunk's
// element range [begin, end) in it.
template <int Depth>
BSAM_HD int locate(const TensorListArgs<Depth>& a, int64_t chunk, int64_t& begin, int64_t& end) {
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

template <typename T>
BSAM_HD bool vector_access(const T* p, int64_t i, int n) {
  return n == 4 && reinterpret_cast<uintptr_t>(p + i) % sizeof(Vec4<T>) == 0;
}

// Loads the n <= 4 elements p[i..i+n) into out[0..n) as U. The scalar path is unrolled
// over k < 4 with a guard, so that out[] stays in registers.
template <typename T, typename U>
BSAM_HD void load4(const T* p, int64_t i, int n, U out[4]) {
  if (vector_access(p, i, n)) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(p + i);
BSAM_UNROLL
    for (int k = 0; k < 4; ++k) out[k] = static_cast<U>(x.v[k]);
  } else {
BSAM_UNROLL
    for (int k = 0; k < 4; ++k) {
      if (k < n) out[k] = static_cast<U>(p[i + k]);
    }
  }
}

template <typename T, typename U>
BSAM_HD void store4(T* p, int64_t i, int n, const U in[4]) {
  if (vector_access(p, i, n)) {
    Vec4<T> x;
BSAM_UNROLL
    for (int k = 0; k < 4; ++k) x.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Vec4<T>*>(p + i) = x;
  } else {
BSAM_UNROLL
    for (int k = 0; k < 4; ++k) {
      if (k < n) p[i + k] = static_cast<T>(in[k]);
    }
  }
}

// What thread `thread` of block `block` in a grid of `grid` blocks does: body(t, i, n) for
// each of its quads (tensor t, elements i..i+n), OR-ing the bools the body returns (an
// inf/NaN seen). The CUDA kernel calls it with (blockIdx.x, gridDim.x, threadIdx.x); the
// host emulation calls it for every (block, thread) in turn.
template <int Depth, typename Body>
BSAM_HD bool for_each_quad(const TensorListArgs<Depth>& a, int64_t block, int64_t grid, int thread,
                           const Body& body) {
  bool bad = false;
  const int64_t chunks = a.chunk_start[a.ntensors];
  for (int64_t chunk = block; chunk < chunks; chunk += grid) {
    int64_t begin, end;
    const int t = locate(a, chunk, begin, end);
    for (int64_t i = begin + 4 * static_cast<int64_t>(thread); i < end; i += 4 * kThreads) {
      bad |= body(a, t, i, end - i < 4 ? static_cast<int>(end - i) : 4);
    }
  }
  return bad;
}

}  // namespace bsam

// The CUDA kernels' own logic, run on the CPU (built by CMakeLists.txt, run by ctest).
//
// launch_ops.h packs tensor lists into launches and picks each op's quad functor exactly as
// bsam_cuda.cu does; here the launch is emulated: every (block, thread) of the grid runs
// for_each_quad in turn, on CPU tensors. The results must equal the CPU kernels' (same math
// header, same order of operations) bit for bit, every output element must be written
// (outputs start as a canary), and the plumbing must touch every element exactly once
// (a counting functor), for lists that hit every path: empty tensors, 1-3 element tails,
// lengths around kChunk, more than kMaxTensors tensors (several launches), misaligned views
// (storage offset 1: the scalar path), grids smaller than the number of chunks
// (grid-stride), inf/NaN in a tail.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "cuda/launch_ops.h"

namespace {

int failures = 0;
int checks = 0;

#define EXPECT(cond, ...)                                                                   \
  do {                                                                                      \
    ++checks;                                                                               \
    if (!(cond)) {                                                                          \
      ++failures;                                                                           \
      std::printf("FAILED %s:%d: %s  [%s]\n", __FILE__, __LINE__, #cond, context.c_str()); \
    }                                                                                       \
  } while (0)

std::string context;

// The launch of launch_ops.h, emulated: grid = min(chunks, max_grid) blocks of kThreads
// threads, each running its share of the quads with its own copy of the functor (as a
// kernel's threads do), the inf/NaN flags ORed into found_inf.
struct EmulatedLaunch {
  int64_t max_grid;
  int* launches;

  template <int Depth, typename Body>
  void operator()(const bsam::TensorListArgs<Depth>& a, int64_t chunks, const Body& body, float* found_inf) const {
    ++*launches;
    const int64_t grid = std::min(chunks, max_grid);
    bool bad = false;
    for (int64_t block = 0; block < grid; ++block) {
      for (int thread = 0; thread < bsam::kThreads; ++thread) {
        Body local = body;
        local.read_device_scalars();
        bad |= bsam::for_each_quad(a, block, grid, thread, local);
      }
    }
    if (Body::kFlagsNonFinite && bad) *found_inf = 1.0f;
  }
};

// Adds one to every element it is given: counts how often the plumbing visits each one.
struct CountQuad {
  static constexpr int kDepth = 1;
  static constexpr bool kFlagsNonFinite = false;
  void read_device_scalars() {}
  bool operator()(const bsam::TensorListArgs<kDepth>& a, int t, int64_t i, int n) const {
    auto* c = static_cast<int32_t*>(a.ptr[0][t]);
    for (int k = 0; k < n; ++k) c[i + k] += 1;
    return false;
  }
};

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// A list of tensors of these sizes; misaligned: each is a view at storage offset 1.
std::vector<at::Tensor> make_list(const std::vector<int64_t>& sizes, at::ScalarType dtype, bool misaligned,
                                  int64_t seed, bool positive = false) {
  std::vector<at::Tensor> out;
  auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  for (int64_t n : sizes) {
    at::Tensor base = at::randn({n + 1}, gen, at::TensorOptions().dtype(at::kDouble));
    if (positive) base = base.abs() + 0.5;
    base = base.to(dtype);
    out.push_back(misaligned ? base.slice(0, 1, n + 1) : base.slice(0, 0, n).clone());
  }
  return out;
}

std::vector<at::Tensor> clone(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) {
    at::Tensor c = at::empty({t.numel() + 1}, t.options());
    c = t.storage_offset() == 1 ? c.slice(0, 1, t.numel() + 1) : c.slice(0, 0, t.numel());
    c.copy_(t);
    out.push_back(c);
  }
  return out;
}

// Same layout, every byte 0xFF (a NaN in every floating dtype): what no op ever writes.
std::vector<at::Tensor> canary_like(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out = clone(ts);
  for (auto& t : out) {
    if (t.numel() > 0) std::memset(t.data_ptr(), 0xFF, t.numel() * t.element_size());
  }
  return out;
}

bool bitwise_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() != b[i].numel()) return false;
    if (a[i].numel() && std::memcmp(a[i].data_ptr(), b[i].data_ptr(), a[i].numel() * a[i].element_size()) != 0) {
      return false;
    }
  }
  return true;
}

at::ScalarType opmath(at::ScalarType t) { return bsam::opmath_of(t); }

struct Layout {
  const char* name;
  std::vector<int64_t> sizes;
  bool misaligned;
};

std::vector<Layout> layouts() {
  const int64_t c = bsam::kChunk;
  std::vector<Layout> out;
  out.push_back({"tails and chunk edges", {0, 1, 2, 3, 4, 5, 7, c - 1, c, c + 1, 0, 2 * c + 3, 6}, false});
  out.push_back({"misaligned views", {1, 3, 5, 8, 13, c + 2, 4}, true});
  std::vector<int64_t> many;  // > kMaxTensors non-empty tensors: several launches
  for (int i = 0; i < 2 * bsam::kMaxTensors + 17; ++i) many.push_back(i % 37 == 0 ? 0 : 1 + (i * 7919) % 61);
  out.push_back({"more than kMaxTensors tensors", many, false});
  return out;
}

int64_t non_empty(const std::vector<int64_t>& sizes) {
  int64_t n = 0;
  for (int64_t s : sizes) n += s > 0;
  return n;
}

std::vector<int64_t> noise_bases(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> bases;
  int64_t next = 8;  // not zero: the base is part of the index
  for (int64_t s : sizes) {
    bases.push_back(next);
    next += (s + 3) / 4 * 4;
  }
  return bases;
}

// ---------------------------------------------------------------------------- the plumbing
void test_every_element_visited_once() {
  for (const Layout& layout : layouts()) {
    for (int64_t grid : {int64_t{1}, int64_t{3}, int64_t{1} << 40}) {
      context = std::string(layout.name) + ", grid " + std::to_string(grid);
      std::vector<at::Tensor> counts;
      for (int64_t n : layout.sizes) {
        at::Tensor base = at::zeros({n + 1}, at::kInt);
        counts.push_back(layout.misaligned ? base.slice(0, 1, n + 1) : base.slice(0, 0, n));
      }
      int launches = 0;
      const EmulatedLaunch launch{grid, &launches};
      bsam::for_each_launch<1>({at::TensorList(counts)}, nullptr,
                               [&](const bsam::TensorListArgs<1>& a, int64_t chunks) {
                                 launch(a, chunks, CountQuad{}, nullptr);
                               });
      bool all_once = true;
      for (const auto& c : counts) all_once &= c.numel() == 0 || (c.eq(1).all().item<bool>());
      EXPECT(all_once);
      const int64_t expected = (non_empty(layout.sizes) + bsam::kMaxTensors - 1) / bsam::kMaxTensors;
      EXPECT(launches == expected);
    }
  }
}

void test_locate_and_vector_choice() {
  context = "locate";
  bsam::TensorListArgs<1> a{};
  a.ntensors = 3;
  const int64_t numel[3] = {5, 3 * bsam::kChunk, bsam::kChunk + 1};
  const int64_t starts[4] = {0, 1, 4, 6};
  for (int t = 0; t < 3; ++t) a.numel[t] = numel[t];
  for (int t = 0; t < 4; ++t) a.chunk_start[t] = starts[t];
  const int expect_tensor[6] = {0, 1, 1, 1, 2, 2};
  const int64_t expect_begin[6] = {0, 0, bsam::kChunk, 2 * bsam::kChunk, 0, bsam::kChunk};
  const int64_t expect_end[6] = {5, bsam::kChunk, 2 * bsam::kChunk, 3 * bsam::kChunk, bsam::kChunk, bsam::kChunk + 1};
  for (int64_t chunk = 0; chunk < 6; ++chunk) {
    int64_t begin = -1, end = -1;
    const int t = bsam::locate(a, chunk, begin, end);
    EXPECT(t == expect_tensor[chunk] && begin == expect_begin[chunk] && end == expect_end[chunk]);
  }
  context = "vector access";
  alignas(16) float buf[12] = {};
  EXPECT(bsam::vector_access(buf, 0, 4));
  EXPECT(!bsam::vector_access(buf, 1, 4));  // storage offset 1
  EXPECT(!bsam::vector_access(buf, 0, 3));  // a tail
  EXPECT(bsam::vector_access(buf, 8, 4));
}

// ---------------------------------------------------------------------------- the ops
using SampleOp = void(at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, double, int64_t, int64_t, bool,
                      std::optional<at::TensorList>, const std::optional<at::Tensor>&, std::optional<int64_t>);
using PerturbOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                       const std::optional<at::Tensor>&, bool, const at::Tensor&, const std::optional<at::Tensor>&,
                       std::optional<int64_t>);
using CheckOp = void(at::TensorList, const at::Tensor&, std::optional<at::TensorList>);
using UpdateOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      const std::optional<at::Tensor>&, double, double, double, double, double, double, double, bool,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::optional<int64_t>);
using NormalOp = void(at::TensorList, at::IntArrayRef, int64_t, int64_t);

constexpr int64_t kSeed = -2;  // 2^64 - 2 as a uint64: both key words non-zero
constexpr int64_t kOffset = (int64_t{1} << 32) + 5;

void test_sample(const Layout& layout, at::ScalarType dtype, int64_t grid) {
  auto cpu = op("bsam_fast::sample_").typed<SampleOp>();
  const auto op_t = opmath(dtype);
  const auto p0 = make_list(layout.sizes, dtype, layout.misaligned, 1);
  const auto w0 = make_list(layout.sizes, op_t, layout.misaligned, 2);
  const auto s = make_list(layout.sizes, op_t, layout.misaligned, 3, true);
  const auto xi = make_list(layout.sizes, op_t, layout.misaligned, 4);
  const auto bases = noise_bases(layout.sizes);
  for (bool load_mean : {true, false}) {
    for (bool given : {false, true}) {
      context = std::string("sample_ ") + layout.name + " " + c10::toString(dtype) + " load_mean " +
                std::to_string(load_mean) + " given " + std::to_string(given) + " grid " + std::to_string(grid);
      // load_mean: params are read, means are output only; else means are read.
      auto p_cpu = clone(p0), w_cpu = load_mean ? canary_like(w0) : clone(w0);
      auto p_emu = load_mean ? clone(p0) : canary_like(p0), w_emu = load_mean ? canary_like(w0) : clone(w0);
      const std::optional<at::TensorList> noise = given ? std::optional<at::TensorList>(xi) : std::nullopt;
      cpu.call(p_cpu, w_cpu, s, bases, 300.0, kSeed, kOffset, load_mean, noise, std::nullopt, std::nullopt);
      int launches = 0;
      bsam::launch_sample(EmulatedLaunch{grid, &launches}, p_emu, w_emu, s, bases, 300.0, kSeed, kOffset, load_mean,
                          noise, std::nullopt);
      EXPECT(bitwise_equal(p_cpu, p_emu));
      EXPECT(bitwise_equal(w_cpu, w_emu));
    }
  }
  // The device noise counter is read in place of `offset`.
  context = std::string("sample_ offset_tensor ") + layout.name + " " + c10::toString(dtype);
  auto p_cpu = clone(p0), w_cpu = clone(w0), p_emu = clone(p0), w_emu = clone(w0);
  cpu.call(p_cpu, w_cpu, s, bases, 300.0, kSeed, kOffset, true, std::nullopt, std::nullopt, std::nullopt);
  int launches = 0;
  bsam::launch_sample(EmulatedLaunch{grid, &launches}, p_emu, w_emu, s, bases, 300.0, kSeed, 0, true, std::nullopt,
                      at::full({1}, kOffset, at::kLong));
  EXPECT(bitwise_equal(p_cpu, p_emu));
}

void test_perturb(const Layout& layout, at::ScalarType dtype, int64_t grid) {
  auto cpu = op("bsam_fast::perturb_").typed<PerturbOp>();
  const auto op_t = opmath(dtype);
  const auto p0 = make_list(layout.sizes, dtype, layout.misaligned, 5);
  const auto g = make_list(layout.sizes, dtype, layout.misaligned, 6);
  const auto w = make_list(layout.sizes, op_t, layout.misaligned, 7);
  const auto s = make_list(layout.sizes, op_t, layout.misaligned, 8, true);
  const auto u0 = make_list(layout.sizes, op_t, layout.misaligned, 9, true);
  const at::Tensor inv = at::full({1}, 0.25, at::kFloat), rho = at::full({1}, 0.07, at::kDouble);
  for (bool first : {true, false}) {
    for (bool tensors : {false, true}) {
      context = std::string("perturb_ ") + layout.name + " " + c10::toString(dtype) + " first " +
                std::to_string(first) + " tensor args " + std::to_string(tensors) + " grid " + std::to_string(grid);
      const std::optional<at::Tensor> inv_scale = tensors ? std::optional<at::Tensor>(inv) : std::nullopt;
      const std::optional<at::Tensor> rho_t = tensors ? std::optional<at::Tensor>(rho) : std::nullopt;
      auto p_cpu = canary_like(p0), u_cpu = first ? canary_like(u0) : clone(u0);
      auto p_emu = canary_like(p0), u_emu = first ? canary_like(u0) : clone(u0);
      at::Tensor f_cpu = at::zeros({1}, at::kFloat), f_emu = at::zeros({1}, at::kFloat);
      cpu.call(p_cpu, g, w, s, u_cpu, tensors ? 0.0 : 0.05, inv_scale, first, f_cpu, rho_t, std::nullopt);
      int launches = 0;
      bsam::launch_perturb(EmulatedLaunch{grid, &launches}, p_emu, g, w, s, u_emu, tensors ? 0.0 : 0.05, inv_scale,
                           first, f_emu, rho_t);
      EXPECT(bitwise_equal(p_cpu, p_emu));
      EXPECT(bitwise_equal(u_cpu, u_emu));
      EXPECT(f_cpu.item<float>() == 0.0f && f_emu.item<float>() == 0.0f);
    }
  }
}

// An inf or NaN in the last element of the last tensor (a tail quad, past other launches)
// is flagged by perturb_ and check_finite_, as by the CPU kernels.
void test_non_finite_in_tail(const Layout& layout, at::ScalarType dtype, int64_t grid) {
  auto cpu_check = op("bsam_fast::check_finite_").typed<CheckOp>();
  const auto op_t = opmath(dtype);
  for (double bad : {INFINITY, NAN}) {
    context = std::string("non-finite in a tail ") + layout.name + " " + c10::toString(dtype);
    auto g = make_list(layout.sizes, dtype, layout.misaligned, 10);
    int64_t last = static_cast<int64_t>(g.size()) - 1;
    while (g[last].numel() == 0) --last;
    g[last][g[last].numel() - 1] = bad;
    at::Tensor f_cpu = at::zeros({1}, at::kFloat), f_emu = at::zeros({1}, at::kFloat);
    cpu_check.call(g, f_cpu, std::nullopt);
    int launches = 0;
    bsam::launch_check_finite(EmulatedLaunch{grid, &launches}, g, f_emu);
    EXPECT(f_cpu.item<float>() == 1.0f && f_emu.item<float>() == 1.0f);
    const auto w = make_list(layout.sizes, op_t, layout.misaligned, 7);
    const auto s = make_list(layout.sizes, op_t, layout.misaligned, 8, true);
    auto p = canary_like(w), u = canary_like(w);
    at::Tensor f_perturb = at::zeros({1}, at::kFloat);
    auto params = make_list(layout.sizes, dtype, layout.misaligned, 5);
    bsam::launch_perturb(EmulatedLaunch{grid, &launches}, params, g, w, s, u, 0.05, std::nullopt, true, f_perturb,
                         std::nullopt);
    EXPECT(f_perturb.item<float>() == 1.0f);
  }
  context = std::string("finite ") + layout.name + " " + c10::toString(dtype);
  const auto g = make_list(layout.sizes, dtype, layout.misaligned, 10);
  at::Tensor f = at::zeros({1}, at::kFloat);
  int launches = 0;
  bsam::launch_check_finite(EmulatedLaunch{grid, &launches}, g, f);
  EXPECT(f.item<float>() == 0.0f);
}

void test_update(const Layout& layout, at::ScalarType dtype, int64_t grid) {
  auto cpu = op("bsam_fast::update_").typed<UpdateOp>();
  const auto op_t = opmath(dtype);
  const auto p0 = make_list(layout.sizes, dtype, layout.misaligned, 11);
  const auto w0 = make_list(layout.sizes, op_t, layout.misaligned, 12);
  const auto gm0 = make_list(layout.sizes, op_t, layout.misaligned, 13);
  const auto s0 = make_list(layout.sizes, op_t, layout.misaligned, 14, true);
  const auto g = make_list(layout.sizes, dtype, layout.misaligned, 15);
  const auto u = make_list(layout.sizes, op_t, layout.misaligned, 16, true);
  const at::Tensor factor = at::full({1}, 1.0 / 3.0, at::kDouble), lr = at::full({1}, 0.03, at::kDouble);
  for (bool write_mean : {true, false}) {
    for (bool tensors : {false, true}) {
      for (float skip : {0.0f, 1.0f}) {
        context = std::string("update_ ") + layout.name + " " + c10::toString(dtype) + " write_mean " +
                  std::to_string(write_mean) + " tensor args " + std::to_string(tensors) + " skip " +
                  std::to_string(skip) + " grid " + std::to_string(grid);
        const std::optional<at::Tensor> factor_t = tensors ? std::optional<at::Tensor>(factor) : std::nullopt;
        const std::optional<at::Tensor> lr_t = tensors ? std::optional<at::Tensor>(lr) : std::nullopt;
        const std::optional<at::Tensor> skip_t =
            tensors ? std::optional<at::Tensor>(at::full({1}, skip, at::kFloat)) : std::nullopt;
        if (!tensors && skip != 0.0f) continue;
        auto p_cpu = canary_like(p0), w_cpu = clone(w0), gm_cpu = clone(gm0), s_cpu = clone(s0);
        auto p_emu = canary_like(p0), w_emu = clone(w0), gm_emu = clone(gm0), s_emu = clone(s0);
        cpu.call(p_cpu, w_cpu, gm_cpu, s_cpu, g, u, factor_t, 0.5, 0.25, tensors ? 9.0 : 0.03, 0.9, 0.999, 1e-3,
                 0.1, write_mean, lr_t, skip_t, std::nullopt);
        int launches = 0;
        bsam::launch_update(EmulatedLaunch{grid, &launches}, p_emu, w_emu, gm_emu, s_emu, g, u, factor_t, 0.5, 0.25,
                            tensors ? 9.0 : 0.03, 0.9, 0.999, 1e-3, 0.1, write_mean, lr_t, skip_t);
        EXPECT(bitwise_equal(p_cpu, p_emu));
        EXPECT(bitwise_equal(w_cpu, w_emu));
        EXPECT(bitwise_equal(gm_cpu, gm_emu));
        EXPECT(bitwise_equal(s_cpu, s_emu));
        if (skip != 0.0f) EXPECT(bitwise_equal(gm_emu, gm0) && bitwise_equal(s_emu, s0));
      }
    }
  }
}

// A plan's bucket over three steps (table_key given): the packed pointer tables are kept
// (packed once per op), only the gradients are new tensors at every step; each step must
// equal the CPU kernels' on the same inputs. Then the same key with other lists: new
// params, and (params kept) new means: packed again, and still equal. lr and rho are
// float32 tensors here (read in place, as float64).
void test_kept_tables(const Layout& layout, at::ScalarType dtype, int64_t grid) {
  static int64_t next_key = 1000;
  const int64_t key = next_key++;
  auto perturb_cpu = op("bsam_fast::perturb_").typed<PerturbOp>();
  auto update_cpu = op("bsam_fast::update_").typed<UpdateOp>();
  auto sample_cpu = op("bsam_fast::sample_").typed<SampleOp>();
  const auto op_t = opmath(dtype);
  const auto bases = noise_bases(layout.sizes);
  const at::Tensor lr = at::full({1}, 0.03f, at::kFloat), rho = at::full({1}, 0.07f, at::kFloat);
  auto p_cpu = make_list(layout.sizes, dtype, layout.misaligned, 21), p_emu = clone(p_cpu);
  auto w_cpu = make_list(layout.sizes, op_t, layout.misaligned, 22), w_emu = clone(w_cpu);
  auto gm_cpu = make_list(layout.sizes, op_t, layout.misaligned, 23), gm_emu = clone(gm_cpu);
  auto s_cpu = make_list(layout.sizes, op_t, layout.misaligned, 24, true), s_emu = clone(s_cpu);
  auto u_cpu = canary_like(s_cpu), u_emu = canary_like(s_cpu);
  const bool master = op_t != dtype;
  auto& perturbs = bsam::perturb_cache<EmulatedLaunch>();
  auto& updates = bsam::update_cache<EmulatedLaunch>();
  const uint64_t perturb_packings = perturbs.packings(), update_packings = updates.packings();
  for (int step = 0; step < 3; ++step) {
    context = std::string("kept tables ") + layout.name + " " + c10::toString(dtype) + " step " +
              std::to_string(step) + " grid " + std::to_string(grid);
    int launches = 0;
    const EmulatedLaunch launch{grid, &launches};
    sample_cpu.call(p_cpu, w_cpu, s_cpu, bases, 300.0, kSeed, kOffset + step, !master, std::nullopt, std::nullopt,
                    key);
    bsam::launch_sample(launch, p_emu, w_emu, s_emu, bases, 300.0, kSeed, kOffset + step, !master, std::nullopt,
                        std::nullopt, key);
    EXPECT(bitwise_equal(p_cpu, p_emu) && bitwise_equal(w_cpu, w_emu));
    const auto g_noisy = make_list(layout.sizes, dtype, layout.misaligned, 30 + step);  // new storage
    at::Tensor f_cpu = at::zeros({1}, at::kFloat), f_emu = at::zeros({1}, at::kFloat);
    perturb_cpu.call(p_cpu, g_noisy, w_cpu, s_cpu, u_cpu, 0.0, std::nullopt, true, f_cpu, rho, key);
    bsam::launch_perturb(launch, p_emu, g_noisy, w_emu, s_emu, u_emu, 0.0, std::nullopt, true, f_emu, rho, key);
    EXPECT(bitwise_equal(p_cpu, p_emu) && bitwise_equal(u_cpu, u_emu));
    const auto g = make_list(layout.sizes, dtype, layout.misaligned, 40 + step);
    update_cpu.call(p_cpu, w_cpu, gm_cpu, s_cpu, g, u_cpu, std::nullopt, 0.5, 1.0, 0.0, 0.9, 0.999, 1e-3, 0.1,
                    master, lr, std::nullopt, key);
    bsam::launch_update(launch, p_emu, w_emu, gm_emu, s_emu, g, u_emu, std::nullopt, 0.5, 1.0, 0.0, 0.9, 0.999,
                        1e-3, 0.1, master, lr, std::nullopt, key);
    EXPECT(bitwise_equal(p_cpu, p_emu) && bitwise_equal(w_cpu, w_emu));
    EXPECT(bitwise_equal(gm_cpu, gm_emu) && bitwise_equal(s_cpu, s_emu));
  }
  EXPECT(perturbs.packings() == perturb_packings + 1 && updates.packings() == update_packings + 1);
  context = std::string("stale key ") + layout.name + " " + c10::toString(dtype);
  auto q_cpu = make_list(layout.sizes, dtype, layout.misaligned, 50), q_emu = clone(q_cpu);
  auto v_cpu = canary_like(s_cpu), v_emu = canary_like(s_cpu);
  const auto g = make_list(layout.sizes, dtype, layout.misaligned, 51);
  at::Tensor f_cpu = at::zeros({1}, at::kFloat), f_emu = at::zeros({1}, at::kFloat);
  perturb_cpu.call(q_cpu, g, w_cpu, s_cpu, v_cpu, 0.05, std::nullopt, true, f_cpu, std::nullopt, key);
  int launches = 0;
  bsam::launch_perturb(EmulatedLaunch{grid, &launches}, q_emu, g, w_emu, s_emu, v_emu, 0.05, std::nullopt, true,
                       f_emu, std::nullopt, key);
  EXPECT(bitwise_equal(q_cpu, q_emu) && bitwise_equal(v_cpu, v_emu));
  // The same params, another means column (storage swapped under a kept key).
  context = std::string("swapped means ") + layout.name + " " + c10::toString(dtype);
  const auto w2 = make_list(layout.sizes, op_t, layout.misaligned, 52);
  auto v2_cpu = canary_like(s_cpu), v2_emu = canary_like(s_cpu);
  perturb_cpu.call(q_cpu, g, w2, s_cpu, v2_cpu, 0.05, std::nullopt, true, f_cpu, std::nullopt, key);
  bsam::launch_perturb(EmulatedLaunch{grid, &launches}, q_emu, g, w2, s_emu, v2_emu, 0.05, std::nullopt, true,
                       f_emu, std::nullopt, key);
  EXPECT(bitwise_equal(q_cpu, q_emu) && bitwise_equal(v2_cpu, v2_emu));
}

void test_normal(const Layout& layout, int64_t grid) {
  if (layout.misaligned) return;  // normal_ allocates its outputs: always aligned in use
  context = std::string("normal_ ") + layout.name + " grid " + std::to_string(grid);
  auto cpu = op("bsam_fast::normal_").typed<NormalOp>();
  const auto like = make_list(layout.sizes, at::kFloat, false, 17);
  const auto bases = noise_bases(layout.sizes);
  auto z_cpu = canary_like(like), z_emu = canary_like(like);
  cpu.call(z_cpu, bases, kSeed, kOffset);
  int launches = 0;
  bsam::launch_normal(EmulatedLaunch{grid, &launches}, z_emu, bases, kSeed, kOffset);
  EXPECT(bitwise_equal(z_cpu, z_emu));
}

}  // namespace

int main() {
  test_every_element_visited_once();
  test_locate_and_vector_choice();
  for (const Layout& layout : layouts()) {
    for (int64_t grid : {int64_t{2}, int64_t{1} << 40}) {  // grid-stride, and one block per chunk
      for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
        test_sample(layout, dtype, grid);
        test_perturb(layout, dtype, grid);
        test_non_finite_in_tail(layout, dtype, grid);
        test_update(layout, dtype, grid);
        test_kept_tables(layout, dtype, grid);
      }
      test_normal(layout, grid);
    }
  }
  std::printf("%d of %d checks failed\n", failures, checks);
  return failures == 0 ? 0 : 1;
}

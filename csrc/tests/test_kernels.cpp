// C++ tests of the bsam_fast ops through the dispatcher (built by CMakeLists.txt, run by ctest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "bsam_math.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      ++failures;                                          \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
    }                                                      \
  } while (0)

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void test_registration() {
  for (const char* name : {"bsam_fast::sample_", "bsam_fast::perturb_",
                           "bsam_fast::check_finite_", "bsam_fast::update_", "bsam_fast::normal_"}) {
    EXPECT(op(name).hasKernelForDispatchKey(c10::DispatchKey::CPU));
  }
}

void test_philox_known_answers() {
  const bsam::uint4x32 r = bsam::philox4x32_10(bsam::uint4x32{{0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u}},
                                               0xA4093822u, 0x299F31D0u);
  EXPECT(r.x[0] == 0xD16CFE09u && r.x[1] == 0x94FDCCEBu && r.x[2] == 0x5001E420u && r.x[3] == 0x24126EA1u);
  const bsam::uint4x32 z = bsam::philox4x32_10(bsam::uint4x32{{0, 0, 0, 0}}, 0, 0);
  EXPECT(z.x[0] == 0x6627E8D5u && z.x[3] == 0x9B00DBD8u);
}

void test_normal_statistics_and_layout() {
  auto normal = op("bsam_fast::normal_").typed<void(at::TensorList, at::IntArrayRef, int64_t, int64_t)>();
  at::Tensor big = at::empty({1 << 20}, at::kFloat);
  normal.call({big}, {0}, 123, 0);
  const double mean = big.mean().item<double>(), var = big.var().item<double>();
  EXPECT(std::fabs(mean) < 4.0 / 1024.0);
  EXPECT(std::fabs(var - 1.0) < 0.01);
  // A tensor's numbers depend only on its base, not on its neighbours in the list.
  at::Tensor a = at::empty({10}, at::kFloat), b = at::empty({7}, at::kFloat), b_alone = at::empty({7}, at::kFloat);
  normal.call({a, b}, {0, 12}, 5, 9);
  normal.call({b_alone}, {12}, 5, 9);
  EXPECT(at::equal(b, b_alone));
  float block[4];
  bsam::normal4(5, 9, 0, block);
  EXPECT(a[0].item<float>() == block[0] && a[3].item<float>() == block[3]);
}

void test_sample_and_update_values() {
  auto sample = op("bsam_fast::sample_").typed<void(at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef,
                                                   double, int64_t, int64_t, bool, std::optional<at::TensorList>,
                                                   const std::optional<at::Tensor>&, std::optional<int64_t>)>();
  at::Tensor p = at::full({5}, 2.0, at::kDouble), w = at::empty({5}, at::kDouble);
  at::Tensor s = at::full({5}, 4.0, at::kDouble), xi = at::arange(5, at::kDouble);
  std::vector<at::Tensor> noise{xi};
  sample.call({p}, {w}, {s}, {0}, 25.0, 0, 0, true, at::TensorList(noise), std::nullopt, std::nullopt);
  for (int i = 0; i < 5; ++i) {
    EXPECT(w[i].item<double>() == 2.0);
    EXPECT(p[i].item<double>() == 2.0 + i / 10.0);  // sqrt(25 * 4) = 10
  }
  auto update = op("bsam_fast::update_").typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                                   at::TensorList, at::TensorList, const std::optional<at::Tensor>&,
                                                   double, double, double, double, double, double, double, bool,
                                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                   std::optional<int64_t>)>();
  at::Tensor gm = at::zeros({5}, at::kDouble), g = at::ones({5}, at::kDouble), u = at::full({5}, 3.0, at::kDouble);
  // A non-zero skip_if leaves the state alone and puts the mean back.
  at::Tensor gm0 = gm.clone();
  update.call({p}, {w}, {gm}, {s}, {g}, {u}, std::nullopt, 1.0, 1.0, 0.5, 0.9, 0.99, 0.0, 0.1, true,
              std::nullopt, at::ones({1}, at::kFloat), std::nullopt);
  EXPECT(at::equal(gm, gm0) && at::equal(p, w));
  // lr from a tensor (0.5) instead of the float argument (99).
  update.call({p}, {w}, {gm}, {s}, {g}, {u}, std::nullopt, 1.0, 1.0, 99.0, 0.9, 0.99, 0.0, 0.1, true,
              at::full({1}, 0.5, at::kDouble), at::zeros({1}, at::kFloat), std::nullopt);
  const double gm_new = 0.1 * 1.0, w_new = 2.0 - 0.5 * gm_new / 4.0, s_new = 0.99 * 4.0 + 0.01 * (3.0 + 0.1);
  EXPECT(std::fabs(gm[0].item<double>() - gm_new) < 1e-15);
  EXPECT(std::fabs(w[0].item<double>() - w_new) < 1e-15 && p[0].item<double>() == w[0].item<double>());
  EXPECT(std::fabs(s[0].item<double>() - s_new) < 1e-14);
}

void test_non_finite_and_bad_input() {
  auto check = op("bsam_fast::check_finite_").typed<void(at::TensorList, const at::Tensor&, std::optional<at::TensorList>)>();
  at::Tensor found = at::zeros({1}, at::kFloat), g = at::ones({100}, at::kFloat);
  check.call({g}, found, std::nullopt);
  EXPECT(found.item<float>() == 0.0f);
  g[57] = INFINITY;
  check.call({g}, found, std::nullopt);
  EXPECT(found.item<float>() == 1.0f);
  bool threw = false;
  try {
    check.call({g}, at::zeros({2}, at::kFloat), std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("found_inf must be a one-element float32 tensor") != std::string::npos;
  }
  EXPECT(threw);
  // like: each gradient must match its parameter (here in shape), checked before any read.
  const std::vector<at::Tensor> params{at::zeros({100}, at::kFloat)};
  const std::vector<at::Tensor> wrong{at::ones({10, 10}, at::kFloat)};
  threw = false;
  try {
    check.call(wrong, found, at::TensorList(params));
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("grads[0] must have shape") != std::string::npos;
  }
  EXPECT(threw);
  check.call({g}, found, at::TensorList(params));  // a match passes
}

}  // namespace

int main() {
  test_registration();
  test_philox_known_answers();
  test_normal_statistics_and_layout();
  test_sample_and_update_values();
  test_non_finite_and_bad_input();
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}

// Helpers shared by the CUDA tests: the skip rule (no usable device -> exit 77, see skip_main.hpp),
// storage <-> double conversions, seeds and poisoning device buffers (all bytes 0xFF: NaN in fp32, fp16
// and bf16). The host and padded device tensors, downloads that count unwritten elements and touched
// padding, and the normwise comparisons are in cuda_harness.hpp.
//   to_d, from_d, from_f            a storage value as double; a double rounded once to T, or through fp32
//   to_storage, values_of           the same, elementwise over a std::vector
//   test_seed(name)                 a fixed seed per name (BASISATTN_TEST_SEED: a number or `random`
//                                   overrides it), printed to stderr at once, so
//                                   that even a run that aborts (sticky CUDA error) shows it; pair it with
//                                   INFO("seed " << seed) for the failure messages
//   exact_attention_tolerance(...)  the normwise error model of exact fp32 attention against the double
//                                   oracle (tests/test_attention.cpp), for the CPU or the CUDA kernel
#pragma once

#include <basisattn/core/eigen.hpp>
#include <basisattn/cuda/context.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

bool test_prerequisites(std::string& why) {
  if (basisattn::cuda_device_count() > 0) return true;
  why = "no usable CUDA device (cudaGetDeviceCount reports none or an error)";
  return false;
}

namespace cudatest {

using basisattn::index_t;

/// A storage value as double, and back (fp32 arithmetic for the 16-bit types, as on the GPU).
template <class T>
double to_d(T x) {
  return static_cast<double>(basisattn::detail::to_compute<float>(x));
}
template <class T>
T from_d(double x) {
  return basisattn::detail::from_compute<T>(x);
}
/// A double rounded to fp32 first, then to T (two roundings for the 16-bit types).
template <class T>
T from_f(double x) {
  return basisattn::detail::from_compute<T>(static_cast<float>(x));
}

/// Every value of x rounded once to T (from_d).
template <class T>
std::vector<T> to_storage(const std::vector<double>& x) {
  std::vector<T> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = from_d<T>(x[i]);
  return r;
}
/// Every stored value of x as double (to_d).
template <class T>
std::vector<double> values_of(const std::vector<T>& x) {
  std::vector<double> r(x.size());
  for (std::size_t i = 0; i < r.size(); ++i) r[i] = to_d(x[i]);
  return r;
}

inline std::uint64_t fresh_seed() {
  std::random_device rd;
  return (std::uint64_t(rd()) << 32) ^ rd();
}

/// A fixed seed per test case: FNV-1a of its name.
inline std::uint64_t name_seed(const char* name) {
  std::uint64_t h = 1469598103934665603ull;
  for (const char* c = name; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 1099511628211ull;
  return h;
}

/// The seed of a test case's random data: fixed per test case (a hash of `name`), so every run and
/// every machine draws the same data; the environment variable BASISATTN_TEST_SEED overrides it with
/// a number (to rerun a reported failure) or with `random` (a fresh seed each run, to explore).
/// Printed to stderr immediately ("<name>: seed N"): a failing CHECK also shows it through the caller's
/// INFO, but a run that dies (abort on a sticky CUDA error, a crash) only leaves this line.
inline std::uint64_t test_seed(const char* name) {
  std::uint64_t s = name_seed(name);
  const char* env = std::getenv("BASISATTN_TEST_SEED");
  if (env && std::strcmp(env, "random") == 0)
    s = fresh_seed();
  else if (env && *env)
    s = std::strtoull(env, nullptr, 0);
  std::fprintf(stderr, "%s: seed %llu (rerun with BASISATTN_TEST_SEED=%llu)\n", name,
               static_cast<unsigned long long>(s), static_cast<unsigned long long>(s));
  std::fflush(stderr);
  return s;
}

/// Normwise relative error bound of exact attention computed in fp32 (scores, softmax and P V sums
/// in fp32, one rounding to T) against the double oracle, as tests/test_attention.cpp derives it for
/// the CPU kernel:  u_T + u_32 (kappa sqrt(d_qk) + sqrt(n_kv) + c),  kappa = max(1, kappa'), kappa' the
/// largest scale sum_e |q_e k_e| over the visible pairs (from the data). c counts the fixed roundings
/// per element: 4 on the CPU (scale multiply, exp, rescale, 1/l); 8 for the CUDA kernels (expf is
/// accurate to 2 ulp, CUDA C Programming Guide, counted for the weight and for the rescale), as
/// tests/cuda/test_cuda_projection.cpp uses. It is a root-mean-square model (rel_error is a Frobenius
/// norm over many outputs): use it for normwise comparisons over many rows, not for single entries.
inline double exact_attention_tolerance(double u_t, double kappa_prime, index_t d_qk, index_t n_kv, bool cuda_kernel) {
  const double u32 = std::ldexp(1.0, -24);
  const double kappa = std::max(1.0, kappa_prime);
  return u_t + u32 * (kappa * std::sqrt(double(d_qk)) + std::sqrt(double(n_kv)) + (cuda_kernel ? 8.0 : 4.0));
}

/// All bytes 0xFF: NaN in fp32, fp16 and bf16.
template <class T>
void poison(const basisattn::cuda_context& ctx, basisattn::device_buffer<T>& b) {
  if (b.empty()) return;
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(b.data(), 0xFF, b.bytes(), ctx.stream()));
  ctx.synchronize();
}

template <class T>
bool is_poison(const T& x) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &x, sizeof(T));
  return std::all_of(bytes, bytes + sizeof(T), [](unsigned char c) { return c == 0xFF; });
}

}  // namespace cudatest

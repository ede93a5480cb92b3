// cpu_peak.hpp - the machine's measured fp32 peak, and alternating pair timing, for basisattn's
// benchmarks and demos (not part of the library).
//
//   fp32_peak_gflops(threads, seconds)   GFLOP/s of a register-resident FMA loop in the widest vector
//                                         type this binary was compiled for (AVX-512: 16 lanes, AVX: 8,
//                                         else 4), 12 independent accumulators per thread (more than
//                                         FMA latency x FMA units on current x86 cores), `threads`
//                                         OpenMP threads at once; the sum over threads. What the
//                                         binary's code could reach at most: speeds are reported as a
//                                         fraction of it.
//   alternating(pairs, a, b)             times a() and b() `pairs` times each, in the order a b, b a,
//                                         a b, ... (so neither always runs first on warm data), after
//                                         one warm-up pair; returns both lists of seconds.
//   median(v)                             the median (upper one for even sizes).
#pragma once

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench_util {

inline double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#if defined(__AVX512F__)
inline constexpr int peak_lanes = 16;
#elif defined(__AVX__)
inline constexpr int peak_lanes = 8;
#else
inline constexpr int peak_lanes = 4;
#endif

namespace detail {
typedef float vfloat __attribute__((vector_size(peak_lanes * sizeof(float))));

/// GFLOP/s of one thread's FMA loop over about `seconds`: 12 named accumulators (kept in registers;
/// an array would live on the stack), each updated by one FMA per step. Not inlined: inside an OpenMP
/// region GCC 12 keeps the accumulators in memory (a third of the speed).
__attribute__((noinline)) inline double fma_loop_gflops(double seconds) {
  constexpr int chains = 12;
  vfloat a, b;
  for (int l = 0; l < peak_lanes; ++l) {
    a[l] = 0.999999f;
    b[l] = 1e-6f;
  }
  vfloat c0 = b, c1 = b * 2.f, c2 = b * 3.f, c3 = b * 4.f, c4 = b * 5.f, c5 = b * 6.f;
  vfloat c6 = b * 7.f, c7 = b * 8.f, c8 = b * 9.f, c9 = b * 10.f, c10 = b * 11.f, c11 = b * 12.f;
  long long iters = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (int r = 0; r < 4096; ++r) {
      c0 = c0 * a + b;  // one FMA each (-ffp-contract=fast, GCC's and Clang's default here)
      c1 = c1 * a + b;
      c2 = c2 * a + b;
      c3 = c3 * a + b;
      c4 = c4 * a + b;
      c5 = c5 * a + b;
      c6 = c6 * a + b;
      c7 = c7 * a + b;
      c8 = c8 * a + b;
      c9 = c9 * a + b;
      c10 = c10 * a + b;
      c11 = c11 * a + b;
      asm volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5));
      asm volatile("" : "+v"(c6), "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));
    }
    iters += 4096;
    elapsed = seconds_since(t0);
  } while (elapsed < seconds);
  const vfloat sum = ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7)) + ((c8 + c9) + (c10 + c11));
  float sink = sum[0];
  asm volatile("" : : "r"(&sink) : "memory");
  return 2.0 * peak_lanes * chains * double(iters) / elapsed * 1e-9;
}
}  // namespace detail

/// The fp32 FMA peak of `threads` threads running at once (GFLOP/s), best of three tries.
inline double fp32_peak_gflops(int threads, double seconds = 0.1) {
  double best = 0;
  for (int attempt = 0; attempt < 3; ++attempt) {
    double sum = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(+ : sum)
    sum += detail::fma_loop_gflops(seconds);
#else
    (void)threads;
    sum = detail::fma_loop_gflops(seconds);
#endif
    best = std::max(best, sum);
  }
  return best;
}

/// Alternating timing of a() and b(): see the top of this header.
template <class A, class B>
std::pair<std::vector<double>, std::vector<double>> alternating(int pairs, A&& a, B&& b) {
  std::vector<double> ta, tb;
  auto time = [](auto& f) {
    const auto t = std::chrono::steady_clock::now();
    f();
    return seconds_since(t);
  };
  time(a);  // warm-up
  time(b);
  for (int i = 0; i < pairs; ++i) {
    if (i % 2 == 0) {
      ta.push_back(time(a));
      tb.push_back(time(b));
    } else {
      tb.push_back(time(b));
      ta.push_back(time(a));
    }
  }
  return {ta, tb};
}

}  // namespace bench_util

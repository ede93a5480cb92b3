// Blocked CPU attention (fp32, d = 128) against the plain double-precision reference.
//
// Each run uses H = 2 heads (so that two threads both have work) and reports:
//   GFLOP       rate counter (printed GFLOP=x/s): 4 n^2 d flops per head non-causal, half that causal
//               (the two GEMMs; softmax not counted)
//   s_per_head  wall time per head
//   (blocked only) peak_GFLOPs: the fp32 FMA peak of the same thread count measured in this process
//               (examples/common/cpu_peak.hpp); median_GFLOPs over the iterations; peak_frac = their ratio
// Arguments: n (= n_q = n_kv), causal (0/1), threads (omp_set_num_threads + Eigen::setNbThreads).
#include <basisattn/attention.hpp>
#include <basisattn/attention/reference.hpp>

#include <benchmark/benchmark.h>

#include "cpu_peak.hpp"

#include <Eigen/Core>

#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using basisattn::index_t;

constexpr index_t heads = 2;
constexpr index_t head_dim = 128;

struct problem {
  index_t n;
  std::vector<float> q, k, v, out;
  explicit problem(index_t n_) : n(n_) {
    std::mt19937_64 g(42);
    std::normal_distribution<float> d(0.f, 1.f);
    const auto size = static_cast<std::size_t>(n * heads * head_dim);
    for (auto* x : {&q, &k, &v}) {
      x->resize(size);
      for (auto& e : *x) e = d(g);
    }
    out.assign(size, 0.f);
  }
  basisattn::tensor3_view<const float> view(const std::vector<float>& x) const {
    return {x.data(), n, heads, head_dim};
  }
  basisattn::tensor3_view<float> out_view() { return {out.data(), n, heads, head_dim}; }
};

void set_threads(int t) {
#if defined(_OPENMP)
  omp_set_num_threads(t);
#endif
  Eigen::setNbThreads(t);
}

double flops_of(index_t n, bool causal) {
  return (causal ? 2.0 : 4.0) * double(n) * double(n) * double(head_dim) * double(heads);
}

void set_counters(benchmark::State& state, index_t n, bool causal) {
  const double flops = flops_of(n, causal);
  state.counters["GFLOP"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["s_per_head"] =
      benchmark::Counter(double(heads), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void bm_attention_blocked(benchmark::State& state) {
  const index_t n = state.range(0);
  const bool causal = state.range(1) != 0;
  const int threads = static_cast<int>(state.range(2));
  set_threads(threads);
  problem p(n);
  basisattn::attention_options opt;
  opt.causal = causal;
  const std::size_t bytes = basisattn::workspace_bytes(basisattn::cpu{}, p.view(p.q), p.view(p.k), p.view(p.v), opt);
  std::vector<unsigned char> workspace(bytes);
  const double peak = bench_util::fp32_peak_gflops(threads);
  std::vector<double> t;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    basisattn::attention(basisattn::cpu{}, p.view(p.q), p.view(p.k), p.view(p.v), p.out_view(), opt, workspace.data(),
                         workspace.size());
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
    t.push_back(bench_util::seconds_since(t0));
  }
  set_counters(state, n, causal);
  const double gflops = flops_of(n, causal) / bench_util::median(t) * 1e-9;
  state.counters["peak_GFLOPs"] = peak;
  state.counters["median_GFLOPs"] = gflops;
  state.counters["peak_frac"] = gflops / peak;
  set_threads(1);
}

void bm_attention_reference(benchmark::State& state) {
  const index_t n = state.range(0);
  const bool causal = state.range(1) != 0;
  problem p(n);
  basisattn::attention_options opt;
  opt.causal = causal;
  for (auto _ : state) {
    basisattn::attention_reference<float, float>(p.view(p.q), p.view(p.k), p.view(p.v), p.out_view(), opt);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, causal);
}

}  // namespace

BENCHMARK(bm_attention_blocked)
    ->ArgNames({"n", "causal", "threads"})
    ->ArgsProduct({{1024, 4096, 16384}, {0, 1}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(bm_attention_reference)
    ->ArgNames({"n", "causal"})
    ->ArgsProduct({{1024}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

BENCHMARK_MAIN();

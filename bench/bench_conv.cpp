// Conv-basis attention (plan + run, fp32 storage, double FFTs) against our exact blocked CPU
// attention, one head, causal, on one thread.
//
// Data: RoPE heads (theta 1e4) whose key content switches at 4 evenly spaced positions (0, n/4, n/2, 3n/4), plus
// Gaussian noise of `noise` x the content on q and k: the structure conv-basis needs holds up to
// that noise, so the counters show what accuracy the speed buys. Values N(0, 1).
// Arguments: n, d (= d_qk = d_v), k, fft (0 = Eigen's FFT, 1 = FFTW when built with it).
// Counters, per benchmark:
//   x_vs_exact    exact attention's time / this benchmark's time per iteration; the exact time is
//                 measured in the same process (the mean of 1-3 runs of attention<float>), once per
//                 (n, d), so the ratio is taken in the same run on the same machine state
//   rel_error     ||Y_conv - Y_exact||_F / ||Y_exact||_F (Y_exact from attention<float>)
//   est_error     the run's own estimate (largest relative error of 8 sampled rows)
//   anchors, repaired_rows, plan_s (the plan's share of the time)
#include <basisattn/attention.hpp>
#include <basisattn/conv.hpp>
#if defined(BASISATTN_BENCH_FFTW)
#include <basisattn/cpu/fftw.hpp>
#endif

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <utility>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using basisattn::index_t;
namespace conv = basisattn::conv;

struct problem {
  index_t n, d;
  std::vector<float> q, k, v, exact;
  double exact_s = 0;
  problem(index_t n_, index_t d_, double noise) : n(n_), d(d_) {
    std::mt19937_64 g(7);
    std::normal_distribution<double> nd(0, 1);
    q.resize(std::size_t(n * d));
    k.resize(q.size());
    v.resize(q.size());
    std::vector<double> q0(static_cast<std::size_t>(d));
    for (auto& x : q0) x = nd(g);
    std::vector<std::vector<double>> seg(4, std::vector<double>(std::size_t(d)));
    for (auto& s : seg)
      for (auto& x : s) x = nd(g);
    for (index_t i = 0; i < n; ++i) {
      const auto& kc = seg[std::size_t(i * 4 / n)];
      for (index_t c = 0; c < d / 2; ++c) {
        const double a = double(i) * std::pow(1e4, -2.0 * double(c) / double(d)), co = std::cos(a), si = std::sin(a);
        auto put = [&](std::vector<float>& x, const std::vector<double>& src) {
          const double x0 = src[std::size_t(2 * c)] + noise * nd(g), x1 = src[std::size_t(2 * c + 1)] + noise * nd(g);
          x[std::size_t(i * d + 2 * c)] = float(x0 * co - x1 * si);
          x[std::size_t(i * d + 2 * c + 1)] = float(x0 * si + x1 * co);
        };
        put(q, q0);
        put(k, kc);
      }
    }
    for (auto& x : v) x = float(nd(g));
    exact.resize(v.size());
    const int reps = n >= 32768 ? 1 : 3;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r)
      basisattn::attention<float>(basisattn::cpu{}, Q(), K(), V(), {exact.data(), n, 1, d});
    exact_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  }
  basisattn::tensor3_view<const float> Q() const { return {q.data(), n, 1, d}; }
  basisattn::tensor3_view<const float> K() const { return {k.data(), n, 1, d}; }
  basisattn::tensor3_view<const float> V() const { return {v.data(), n, 1, d}; }
};

constexpr double noise = 0.01;

const problem& get_problem(index_t n, index_t d) {
  static std::map<std::pair<index_t, index_t>, problem> cache;
  auto it = cache.find({n, d});
  if (it == cache.end()) it = cache.emplace(std::make_pair(n, d), problem(n, d, noise)).first;
  return it->second;
}

void one_thread() {
#if defined(_OPENMP)
  omp_set_num_threads(1);
#endif
  Eigen::setNbThreads(1);
}

template <class FFT>
void BM_conv(benchmark::State& state) {
  one_thread();
  const index_t n = state.range(0), d = state.range(1), k = state.range(2);
  const problem& p = get_problem(n, d);
  std::vector<float> out(p.v.size());
  conv::options o;
  o.k = k;
  o.tolerance = std::numeric_limits<double>::infinity();  // time the conv-basis path itself, never the fallback
  conv::report rep;
  double plan_s = 0, total_s = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const conv::plan pl = conv::make_plan<float>(basisattn::cpu{}, p.Q(), p.K(), o);
    const auto t1 = std::chrono::steady_clock::now();
    rep = conv::run<float, FFT>(basisattn::cpu{}, pl, p.Q(), p.K(), p.V(), {out.data(), n, 1, d});
    benchmark::DoNotOptimize(out.data());
    plan_s += std::chrono::duration<double>(t1 - t0).count();
    total_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += double(out[i] - p.exact[i]) * double(out[i] - p.exact[i]);
    den += double(p.exact[i]) * double(p.exact[i]);
  }
  const double iters = double(state.iterations());
  state.counters["x_vs_exact"] = p.exact_s / (total_s / iters);
  state.counters["rel_error"] = std::sqrt(num / den);
  state.counters["est_error"] = rep.heads[0].estimated_error;
  state.counters["anchors"] = double(rep.heads[0].anchors);
  state.counters["repaired_rows"] = double(rep.heads[0].repaired_rows);
  state.counters["plan_s"] = plan_s / iters;
}

void BM_exact(benchmark::State& state) {
  one_thread();
  const index_t n = state.range(0), d = state.range(1);
  const problem& p = get_problem(n, d);
  std::vector<float> out(p.v.size());
  for (auto _ : state) {
    basisattn::attention<float>(basisattn::cpu{}, p.Q(), p.K(), p.V(), {out.data(), n, 1, d});
    benchmark::DoNotOptimize(out.data());
  }
}

void conv_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "d", "k"});
  for (index_t n : {4096, 16384, 65536})
    for (index_t d : {64, 128})
      for (index_t k : {4, 16, 64}) b->Args({n, d, k});
  b->Args({1024, 64, 4});  // smoke size
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_exact)
    ->ArgNames({"n", "d"})
    ->Args({1024, 64})
    ->Args({4096, 64})
    ->Args({16384, 64})
    ->Args({65536, 64})
    ->Args({4096, 128})
    ->Args({16384, 128})
    ->Args({65536, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_conv, conv::fft_eigen)->Apply(conv_args);
#if defined(BASISATTN_BENCH_FFTW)
BENCHMARK_TEMPLATE(BM_conv, conv::fft_fftw)->Apply(conv_args);
#endif

BENCHMARK_MAIN();

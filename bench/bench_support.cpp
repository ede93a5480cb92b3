// Support-basis attention (basisattn::support) against the exact blocked CPU attention, fp32 storage.
//
// Data (per shape, fixed seed): q and k rows are N(0, sigma^2) with sigma = 0.08, except a fraction of
// 2% "outlier" rows with N(0, 1) entries (these land in the supports R and C); v is N(0, 1). H = 2
// heads, n_q = n_kv = n. The exact output (attention<float>(cpu{}, ...)) is computed once per shape and
// cached; every support-basis run reports beside its time:
//   R, C         |R|/n and |C|/n (mean over heads)
//   degree, r    highest polynomial degree and its feature count
//   B, poly_err  score bound and the polynomial's max relative error on [-B, B]
//   err          ||Y - Y_exact||_F / ||Y_exact||_F over the whole output (measured, not estimated)
//   uniform_err  the same error for uniform attention (the mean of the visible values): with scores
//                this small (|s| <= B ~ 0.1 off the supports) uniform attention is already close, so
//                err must be read against it
//   est_err      the run's own sampled estimate (max over heads of estimated_error, 16 rows per head)
//   repaired_rows     rows recomputed exactly because of non-positive denominators
//   plan_ms      time of make_plan (not included in the reported time, which is run only)
// The fallback tolerance is infinite here (the point is to measure the approximation).
// Arguments: n, d, causal, degree, threshold (x1000), sketch size (0: exact monomial features).
#include <basisattn/attention.hpp>
#include <basisattn/support.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

namespace {

using basisattn::index_t;

constexpr index_t heads = 2;

struct problem {
  index_t n, d;
  std::vector<float> q, k, v;
  problem(index_t n_, index_t d_) : n(n_), d(d_) {
    std::mt19937_64 g(42);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    const auto size = static_cast<std::size_t>(n * heads * d);
    for (auto* x : {&q, &k}) {
      x->resize(size);
      for (index_t r = 0; r < n * heads; ++r) {
        const float sc = u(g) < 0.02f ? 1.0f : 0.08f;
        for (index_t e = 0; e < d; ++e) (*x)[static_cast<std::size_t>(r * d + e)] = sc * nd(g);
      }
    }
    v.resize(size);
    for (auto& e : v) e = nd(g);
  }
  basisattn::tensor3_view<const float> view(const std::vector<float>& x) const { return {x.data(), n, heads, d}; }
};

/// Problems and exact outputs, built once per (n, d, causal).
struct cached {
  std::unique_ptr<problem> p;
  std::vector<float> exact;
  double uniform_err = 0;  ///< error of uniform attention (the mean of the visible values)
};
cached& get(index_t n, index_t d, bool causal) {
  static std::map<std::tuple<index_t, index_t, bool>, cached> cache;
  cached& c = cache[{n, d, causal}];
  if (!c.p) {
    c.p = std::make_unique<problem>(n, d);
    c.exact.assign(c.p->q.size(), 0.f);
    basisattn::attention_options ao;
    ao.causal = causal;
    basisattn::attention(basisattn::cpu{}, c.p->view(c.p->q), c.p->view(c.p->k), c.p->view(c.p->v),
                         basisattn::tensor3_view<float>(c.exact.data(), n, heads, d), ao);
    // Uniform attention: row i is the mean of v over its visible keys (prefix sums when causal).
    double e2 = 0, w2 = 0;
    std::vector<double> sum(static_cast<std::size_t>(heads * d), 0.0);
    if (!causal)
      for (std::size_t j = 0; j < c.p->v.size(); ++j) sum[j % sum.size()] += c.p->v[j];
    for (index_t i = 0; i < n; ++i)
      for (std::size_t e = 0; e < sum.size(); ++e) {
        const std::size_t at = static_cast<std::size_t>(i) * sum.size() + e;
        if (causal) sum[e] += c.p->v[at];
        const double u = sum[e] / double(causal ? i + 1 : n), want = c.exact[at];
        e2 += (u - want) * (u - want);
        w2 += want * want;
      }
    c.uniform_err = std::sqrt(e2 / w2);
  }
  return c;
}

void bm_exact(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  cached& c = get(n, d, causal);
  std::vector<float> out(c.exact.size());
  basisattn::attention_options ao;
  ao.causal = causal;
  const std::size_t bytes =
      basisattn::workspace_bytes(basisattn::cpu{}, c.p->view(c.p->q), c.p->view(c.p->k), c.p->view(c.p->v), ao);
  std::vector<unsigned char> ws(bytes);
  for (auto _ : state) {
    basisattn::attention(basisattn::cpu{}, c.p->view(c.p->q), c.p->view(c.p->k), c.p->view(c.p->v),
                         basisattn::tensor3_view<float>(out.data(), n, heads, d), ao, ws.data(), ws.size());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
}

void bm_support(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  cached& c = get(n, d, causal);
  namespace sup = basisattn::support;
  sup::options o;
  o.causal = causal;
  o.max_degree = static_cast<int>(state.range(3));
  o.target_error = 1e-12;  // use max_degree
  o.threshold = static_cast<double>(state.range(4)) * 1e-3;
  o.sketch = state.range(5) > 0;
  o.sketch_size = o.sketch ? state.range(5) : 256;
  o.tolerance = INFINITY;
  o.max_features = std::int64_t(1) << 20;
  const auto t0 = std::chrono::steady_clock::now();
  const sup::plan p = sup::make_plan(basisattn::cpu{}, c.p->view(c.p->q), c.p->view(c.p->k), o);
  const double plan_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::vector<float> out(c.exact.size());
  const std::size_t bytes = sup::workspace_bytes(basisattn::cpu{}, p, d);
  std::vector<unsigned char> ws(bytes);
  std::vector<sup::head_report> rep(static_cast<std::size_t>(heads));
  for (auto _ : state) {
    sup::run(basisattn::cpu{}, p, c.p->view(c.p->q), c.p->view(c.p->k), c.p->view(c.p->v),
             basisattn::tensor3_view<float>(out.data(), n, heads, d), ws.data(), ws.size(), rep.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  double e2 = 0, w2 = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double dlt = double(out[i]) - double(c.exact[i]);
    e2 += dlt * dlt;
    w2 += double(c.exact[i]) * double(c.exact[i]);
  }
  double rq = 0, ck = 0, bound = 0, perr = 0, est = 0, bad = 0;
  int degree = 0;
  std::int64_t r = 0;
  for (const auto& h : rep) {
    rq += h.query_support / heads;
    ck += h.key_support / heads;
    degree = std::max(degree, h.degree);
    r = std::max(r, h.features);
    bound = std::max(bound, h.bound);
    perr = std::max(perr, h.poly_error);
    est = std::max(est, h.estimated_error);
    bad += double(h.repaired_rows);
  }
  state.counters["R"] = rq;
  state.counters["C"] = ck;
  state.counters["degree"] = degree;
  state.counters["r"] = double(r);
  state.counters["B"] = bound;
  state.counters["poly_err"] = perr;
  state.counters["err"] = std::sqrt(e2 / w2);
  state.counters["uniform_err"] = c.uniform_err;
  state.counters["est_err"] = est;
  state.counters["repaired_rows"] = bad;
  state.counters["plan_ms"] = plan_ms;
  state.counters["ws_MB"] = double(bytes) / 1e6;
}

}  // namespace

BENCHMARK(bm_exact)
    ->ArgNames({"n", "d", "causal"})
    ->ArgsProduct({{4096, 16384, 65536}, {64}, {1}})
    ->Args({4096, 64, 0})
    ->Args({16384, 128, 1})
    ->Args({65536, 128, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(bm_support)
    ->ArgNames({"n", "d", "causal", "deg", "T_milli", "sketch"})
    // d = 64: degree 1 and 2 (r = 65, 2145), threshold 0.25 and 0.5
    ->ArgsProduct({{4096, 16384, 65536}, {64}, {1}, {1, 2}, {250, 500}, {0}})
    ->Args({4096, 64, 0, 2, 250, 0})
    // sketched degree 2 (r = 1 + d + m)
    ->Args({16384, 64, 1, 2, 250, 256})
    ->Args({16384, 128, 1, 2, 250, 256})
    // d = 128, degree 1 and 2 (r = 129, 8385)
    ->Args({16384, 128, 1, 1, 250, 0})
    ->Args({65536, 128, 1, 1, 500, 0})
    ->Args({65536, 128, 1, 2, 500, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();

// The two approximate attentions on the GPU against exact CUDA attention (Google Benchmark; times
// measured with CUDA events on the context's stream, reported as manual time; --benchmark_out=f.json
// --benchmark_out_format=json for JSON). Without a usable GPU every benchmark reports the error
// "no usable CUDA device" and the program exits 0 within a second or so.
//
// Measurement rules (as in bench_cuda.cpp):
//   * each timed region is preceded, outside its events, by an L2 flush (cudaMemsetAsync over 2 x the
//     device's L2 size, cudabench::l2_flusher): every run reads q, k, v from HBM;
//   * the exact and the approximate run each have their own events and alternate: even iterations
//     run exact first, odd iterations the approximation first;
//   * fixed iteration counts: 10 at n = 4096 and 16384, 3 at n = 65536; counters are medians over
//     iterations; Google Benchmark's time column is the mean of exact + approximation per iteration;
//   * warm-up before the loop: the approximation at full size (cuFFT plans, cuBLAS heuristics), exact
//     attention on the first 256 tokens (module loading; same kernel);
//   * plans are made on the host once per configuration (not timed: plan_ms), and the data once per
//     (n, d) (the plans and data of the last configuration are kept: equal arguments run in a row);
//   * setup_s: host seconds from the start of the benchmark to the loop (data, plan, context, uploads,
//     workspace, warm-ups). The JSON context carries the device (cuda_device, cuda_sm_count, ...).
//   exact_TFLOPs: 2 * (visible query-key pairs, causal: n (n + 1) / 2) * heads * (d_qk + d_v) per
//   second of the exact run (the kernel has no tensor cores; fp32 data here).
//   Google Benchmark appends /iterations:<n>/manual_time to every name below.
//
// BM_conv_cuda/n:<n>/d:<d>/k:<k>: conv-basis attention (conv::run on conv::upload(ctx, plan), fp32
//   storage, default options: causal, FFTs in double) against exact CUDA attention, one head, causal;
//   the data of bench_conv (RoPE heads whose key content switches at 4 evenly spaced positions, noise
//   0.01, v N(0, 1)). The workspace and the cuFFT plan cache are made once, outside the loop.
//   Counters (medians over iterations where a time):
//     exact_ms, conv_ms, ratio = exact_ms / conv_ms, exact_TFLOPs
//     err        ||Y_conv - Y_exact||_F / ||Y_exact||_F against the exact CUDA output (fp32), both
//                copied back once after the loop
//     est        the run's own estimate (report::max_estimated_error(), 8 sampled rows)
//     fell_back  heads recomputed exactly (report::fallbacks; tolerance set to infinity here: never)
//     repaired_rows, anchors, plan_ms, setup_s
//
// BM_support_cuda/n:<n>/d:<d>/deg:<g>/T_milli:<t>/sketch:<m>: support-basis attention
//   (support::run on support::upload(ctx, plan), fp32 storage) against exact CUDA attention, 2 heads, causal; the
//   data and options of bench_support (entries N(0, 0.08^2) with 2% outlier rows N(0, 1), v N(0, 1);
//   max_degree g, threshold t / 1000, sketch size m (0: exact monomial features), target_error 1e-12,
//   infinite tolerance, max_features 2^20). The workspace is allocated once. Counters:
//     exact_ms, support_ms, ratio = exact_ms / support_ms, exact_TFLOPs
//     R, C         |R|/n and |C|/n (mean over heads)
//     err          ||Y - Y_exact||_F / ||Y_exact||_F against the exact CUDA output (copied back once)
//     uniform_err  the same error for uniform attention (prefix means of v), against the same output
//     est_err      the run's own sampled estimate (max over heads)
//     repaired_rows     rows recomputed exactly (sum over heads)
//     poly_rows    rows whose output came (partly) from the polynomial, sum over heads: the GPU run's
//                  report when it fills it, otherwise counted from the plan (rows outside R with a
//                  visible key outside C) less repaired_rows, as the CPU run counts them
//     degree, r, plan_ms, setup_s
//
// Default run (no filter) and its estimated time on an H200. Exact attention (fp32, the non-tensor-core
// kernel) at an assumed ~4 TFLOP/s (~2 at n = 4096 with one head: 256 blocks do not fill 132 SMs):
// 1 head d 64 / 128: n 4096 ~1 / 2 ms, 16384 ~9 / 17 ms, 65536 ~0.14 / 0.27 s; 2 heads twice that.
// The approximations are assumed to cost at most as much as exact attention at 16K-64K and a few ms
// at 4K (an over-estimate where they win). Iteration = flushes + exact + approximation + host syncs.
//   BM_conv_cuda: 18 benchmarks (n x d x k): 4096 ~0.4 s, 16384 ~1.6 s, 65536 (3 iterations + the
//     full-size warm-up of conv) d 64 ~2.9 s, d 128 ~5.8 s                   ~11 s GPU
//   BM_support_cuda: 17 benchmarks: 4096 ~0.3 s, 16384 d 64 ~1.4 s, the sketched and d 128 16384
//     points ~2 s, 65536 d 64 ~7.7 s, 65536 d 128 ~7.7 s                       ~19 s GPU
//   host: data + plans ~4 s on 2 cores (measured: conv 2.2 s, support 1.9 s in all), uploads, error
//     sums, CUDA start-up                                                     ~6 s
//   total ~35 s (about a minute at half the assumed attention throughput).
#include <basisattn/attention/options.hpp>
#include <basisattn/conv.hpp>
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/conv.hpp>
#include <basisattn/cuda/cufft.hpp>
#include <basisattn/cuda/support.hpp>
#include <basisattn/support.hpp>

#include <benchmark/benchmark.h>

#include "cuda_bench_util.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <random>
#include <tuple>
#include <limits>
#include <vector>

using namespace basisattn;

namespace {

using cudabench::have_device;
using cudabench::l2_flusher;
using cudabench::median;
using cudabench::seconds_since;
using cudabench::timed_pairs;
using steady = std::chrono::steady_clock;

/// Iterations at n tokens (bounded GPU time).
int iterations_for(long n) { return n <= 16384 ? 10 : 3; }

/// Exact attention on the first min(n, 256) tokens of q, k, v (module loading before the loop).
void warm_exact(const cuda_context& ctx, const tensor3_view<const float>& q, const tensor3_view<const float>& k,
                const tensor3_view<const float>& v, const tensor3_view<float>& o, const attention_options& ao) {
  const index_t w = std::min<index_t>(q.extent[0], 256);
  auto head = [w](auto x) {
    x.extent[0] = w;
    return x;
  };
  attention<float>(ctx, head(q), head(k), head(v), head(o), ao);
}

/// ||a - b||_F / ||b||_F.
double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double e2 = 0, w2 = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double dl = double(a[i]) - double(b[i]);
    e2 += dl * dl;
    w2 += double(b[i]) * double(b[i]);
  }
  return w2 > 0 ? std::sqrt(e2 / w2) : std::sqrt(e2);
}

std::vector<float> download(const cuda_context& ctx, const device_buffer<float>& b) {
  std::vector<float> h(static_cast<std::size_t>(b.size()));
  b.download(ctx, h.data(), b.size());
  return h;
}

double elapsed_ms(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// ---------------------------------------------------------------------------------------------------
// Conv-basis

/// bench_conv's data (same generator, same seed): one head, [n, 1, d].
struct conv_problem {
  index_t n = 0, d = 0;
  std::vector<float> q, k, v;
  conv_problem(index_t n_, index_t d_, double noise) : n(n_), d(d_) {
    std::mt19937_64 g(7);
    std::normal_distribution<double> nd(0, 1);
    const auto size = static_cast<std::size_t>(n * d);
    q.resize(size);
    k.resize(size);
    v.resize(size);
    std::vector<double> q0(static_cast<std::size_t>(d));
    for (auto& x : q0) x = nd(g);
    std::vector<std::vector<double>> seg(4, std::vector<double>(static_cast<std::size_t>(d)));
    for (auto& s : seg)
      for (auto& x : s) x = nd(g);
    for (index_t i = 0; i < n; ++i) {
      const auto& kc = seg[static_cast<std::size_t>(i * 4 / n)];
      for (index_t c = 0; c < d / 2; ++c) {
        const double a = double(i) * std::pow(1e4, -2.0 * double(c) / double(d)), co = std::cos(a), si = std::sin(a);
        auto rotate = [&](std::vector<float>& x, const std::vector<double>& src) {
          const double x0 = src[static_cast<std::size_t>(2 * c)] + noise * nd(g);
          const double x1 = src[static_cast<std::size_t>(2 * c + 1)] + noise * nd(g);
          x[static_cast<std::size_t>(i * d + 2 * c)] = float(x0 * co - x1 * si);
          x[static_cast<std::size_t>(i * d + 2 * c + 1)] = float(x0 * si + x1 * co);
        };
        rotate(q, q0);
        rotate(k, kc);
      }
    }
    for (auto& x : v) x = float(nd(g));
  }
  tensor3_view<const float> host(const std::vector<float>& x) const { return {x.data(), n, 1, d}; }
};

/// The last (n, d) problem and the last (n, d, k) plan (benchmarks with equal arguments run one after
/// the other, and Google Benchmark calls a benchmark several times while it picks the iterations).
const conv_problem& get_conv_problem(index_t n, index_t d) {
  static std::unique_ptr<conv_problem> last;
  if (!last || last->n != n || last->d != d) {
    last.reset();
    last = std::make_unique<conv_problem>(n, d, 0.01);
  }
  return *last;
}

struct conv_plan_entry {
  index_t n = -1, d = -1, k = -1;
  conv::plan plan;
  double plan_ms = 0;
};

const conv_plan_entry& get_conv_plan(const conv_problem& p, index_t k) {
  static conv_plan_entry last;
  if (last.n != p.n || last.d != p.d || last.k != k) {
    last = conv_plan_entry{};
    conv::options o;
    o.k = k;
    o.tolerance = std::numeric_limits<double>::infinity();  // time the conv-basis path itself, never the fallback
    const auto t0 = std::chrono::steady_clock::now();
    last.plan = conv::make_plan<float>(cpu{}, p.host(p.q), p.host(p.k), o);
    last.plan_ms = elapsed_ms(t0);
    last.n = p.n, last.d = p.d, last.k = k;
  }
  return last;
}

void BM_conv_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  const auto t0 = steady::now();
  const index_t n = state.range(0), d = state.range(1), k = state.range(2);
  try {
    const conv_problem& p = get_conv_problem(n, d);
    const conv_plan_entry& pe = get_conv_plan(p, k);
    const conv::plan& plan = pe.plan;

    cuda_context ctx;
    l2_flusher l2;
    const auto q = to_device(ctx, p.q.data(), n * d);
    const auto kk = to_device(ctx, p.k.data(), n * d);
    const auto v = to_device(ctx, p.v.data(), n * d);
    device_buffer<float> y_exact(n * d), y_conv(n * d);
    const tensor3_view<const float> qv(q.data(), n, 1, d), kv(kk.data(), n, 1, d), vv(v.data(), n, 1, d);
    const tensor3_view<float> ev(y_exact.data(), n, 1, d), cv(y_conv.data(), n, 1, d);
    attention_options ao;
    ao.causal = plan.opt.causal;
    ao.scale = plan.scale;
    const conv::device_plan dplan = conv::upload(ctx, plan);  // once, as an engine would
    device_buffer<unsigned char> ws(static_cast<index_t>(conv::workspace_bytes(ctx, dplan, d)));
    cufft_plan_cache fft_plans;

    // warm-up: module loading, the cuFFT plans
    warm_exact(ctx, qv, kv, vv, ev, ao);
    conv::report rep = conv::run<float>(ctx, dplan, qv, kv, vv, cv, ws.data(), ws.bytes(), fft_plans);
    ctx.synchronize();
    state.counters["setup_s"] = seconds_since(t0);

    std::vector<double> se, sc;
    timed_pairs(
        state, ctx, l2, [&] { attention<float>(ctx, qv, kv, vv, ev, ao); },
        [&] { rep = conv::run<float>(ctx, dplan, qv, kv, vv, cv, ws.data(), ws.bytes(), fft_plans); }, se, sc);
    ctx.synchronize();
    const double err = rel_error(download(ctx, y_conv), download(ctx, y_exact));
    const double me = median(se), mc = median(sc);
    index_t repaired = 0, anchors = 0;
    for (const auto& h : rep.heads) {
      repaired += h.repaired_rows;
      anchors = std::max(anchors, h.anchors);
    }
    state.counters["exact_ms"] = me * 1e3;
    state.counters["conv_ms"] = mc * 1e3;
    state.counters["ratio"] = mc > 0 ? me / mc : 0.0;
    state.counters["exact_TFLOPs"] = me > 0 ? cudabench::attention_flops(n, n, 1, d, d, ao.causal) / me * 1e-12 : 0.0;
    state.counters["err"] = err;
    state.counters["est"] = rep.max_estimated_error();
    state.counters["fell_back"] = double(rep.fallbacks);
    state.counters["repaired_rows"] = double(repaired);
    state.counters["anchors"] = double(anchors);
    state.counters["plan_ms"] = pe.plan_ms;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// Support-basis

constexpr index_t support_heads = 2;

/// bench_support's data (same generator, same seed): [n, 2, d].
struct support_problem {
  index_t n = 0, d = 0;
  std::vector<float> q, k, v;
  support_problem(index_t n_, index_t d_) : n(n_), d(d_) {
    std::mt19937_64 g(42);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    const auto size = static_cast<std::size_t>(n * support_heads * d);
    for (auto* x : {&q, &k}) {
      x->resize(size);
      for (index_t r = 0; r < n * support_heads; ++r) {
        const float sc = u(g) < 0.02f ? 1.0f : 0.08f;
        for (index_t e = 0; e < d; ++e) (*x)[static_cast<std::size_t>(r * d + e)] = sc * nd(g);
      }
    }
    v.resize(size);
    for (auto& e : v) e = nd(g);
  }
  tensor3_view<const float> host(const std::vector<float>& x) const { return {x.data(), n, support_heads, d}; }
};

const support_problem& get_support_problem(index_t n, index_t d) {
  static std::unique_ptr<support_problem> last;
  if (!last || last->n != n || last->d != d) {
    last.reset();
    last = std::make_unique<support_problem>(n, d);
  }
  return *last;
}

struct support_plan_entry {
  std::tuple<index_t, index_t, long, long, long> key{-1, -1, -1, -1, -1};
  std::unique_ptr<support::plan> plan;
  double plan_ms = 0;
};

const support_plan_entry& get_support_plan(const support_problem& p, long degree, long t_milli, long sketch) {
  static support_plan_entry last;
  const auto key = std::make_tuple(p.n, p.d, degree, t_milli, sketch);
  if (!last.plan || last.key != key) {
    last.plan.reset();
    support::options o;
    o.causal = true;
    o.max_degree = static_cast<int>(degree);
    o.target_error = 1e-12;  // use max_degree
    o.threshold = static_cast<double>(t_milli) * 1e-3;
    o.sketch = sketch > 0;
    o.sketch_size = o.sketch ? sketch : 256;
    o.tolerance = INFINITY;
    o.max_features = std::int64_t(1) << 20;
    const auto t0 = std::chrono::steady_clock::now();
    last.plan = std::make_unique<support::plan>(support::make_plan(cpu{}, p.host(p.q), p.host(p.k), o));
    last.plan_ms = elapsed_ms(t0);
    last.key = key;
  }
  return last;
}

/// Rows outside R with a visible key outside C, summed over the query heads (what the CPU run counts
/// in poly_rows before it takes out the bad rows).
double plan_poly_rows(const support::plan& p) {
  const auto& sh = p.shape;
  double rows = 0;
  for (index_t h = 0; h < sh.h_q; ++h) {
    const auto& qb = p.q_bucket[static_cast<std::size_t>(h)];
    const auto& pre = p.k_poly_prefix[static_cast<std::size_t>(h / sh.group)];
    for (index_t i = 0; i < sh.n_q; ++i) {
      if (qb[static_cast<std::size_t>(i)] >= p.levels) continue;  // in R
      const index_t vis = p.options.causal ? std::min(sh.n_kv, i + sh.causal_offset + 1) : sh.n_kv;
      if (vis > 0 && pre[static_cast<std::size_t>(vis)] > 0) rows += 1;
    }
  }
  return rows;
}

/// Relative error of causal uniform attention (row i: the mean of v over keys 0..i) against `exact`.
double uniform_error(const support_problem& p, const std::vector<float>& exact) {
  const std::size_t width = static_cast<std::size_t>(support_heads * p.d);
  std::vector<double> sum(width, 0.0);
  double e2 = 0, w2 = 0;
  for (index_t i = 0; i < p.n; ++i)
    for (std::size_t e = 0; e < width; ++e) {
      const std::size_t at = static_cast<std::size_t>(i) * width + e;
      sum[e] += p.v[at];
      const double u = sum[e] / double(i + 1), want = exact[at];
      e2 += (u - want) * (u - want);
      w2 += want * want;
    }
  return std::sqrt(e2 / w2);
}

void BM_support_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  const auto t0 = steady::now();
  const index_t n = state.range(0), d = state.range(1);
  try {
    const support_problem& p = get_support_problem(n, d);
    const support_plan_entry& pe = get_support_plan(p, state.range(2), state.range(3), state.range(4));
    const support::plan& plan = *pe.plan;

    cuda_context ctx;
    l2_flusher l2;
    const index_t size = n * support_heads * d;
    const auto q = to_device(ctx, p.q.data(), size);
    const auto k = to_device(ctx, p.k.data(), size);
    const auto v = to_device(ctx, p.v.data(), size);
    device_buffer<float> y_exact(size), y_sup(size);
    const tensor3_view<const float> qv(q.data(), n, support_heads, d), kv(k.data(), n, support_heads, d),
        vv(v.data(), n, support_heads, d);
    const tensor3_view<float> ev(y_exact.data(), n, support_heads, d), sv(y_sup.data(), n, support_heads, d);
    attention_options ao;
    ao.causal = plan.options.causal;
    ao.scale = plan.shape.scale;
    const support::device_plan dplan = support::upload(ctx, plan);  // once, as an engine would
    device_buffer<unsigned char> ws(static_cast<index_t>(support::workspace_bytes(ctx, dplan, d)));
    std::vector<support::head_report> rep(static_cast<std::size_t>(support_heads));

    // warm-up: module loading, cuBLAS heuristics
    warm_exact(ctx, qv, kv, vv, ev, ao);
    support::run<float>(ctx, dplan, qv, kv, vv, sv, ws.data(), ws.bytes(), rep.data());
    ctx.synchronize();
    state.counters["setup_s"] = seconds_since(t0);

    std::vector<double> se, ss;
    timed_pairs(
        state, ctx, l2, [&] { attention<float>(ctx, qv, kv, vv, ev, ao); },
        [&] { support::run<float>(ctx, dplan, qv, kv, vv, sv, ws.data(), ws.bytes(), rep.data()); }, se, ss);
    ctx.synchronize();
    const std::vector<float> exact = download(ctx, y_exact);
    const double err = rel_error(download(ctx, y_sup), exact);
    double rq = 0, ck = 0, est = 0, bad = 0, poly = 0;
    int degree = 0;
    std::int64_t r = 0;
    for (const auto& h : rep) {
      rq += h.query_support / double(support_heads);
      ck += h.key_support / double(support_heads);
      est = std::max(est, h.estimated_error);
      bad += double(h.repaired_rows);
      poly += double(h.poly_rows);
      degree = std::max(degree, h.degree);
      r = std::max(r, h.features);
    }
    if (poly == 0) poly = std::max(0.0, plan_poly_rows(plan) - bad);  // the GPU run leaves poly_rows to the plan's 0
    const double me = median(se), ms = median(ss);
    state.counters["exact_ms"] = me * 1e3;
    state.counters["support_ms"] = ms * 1e3;
    state.counters["ratio"] = ms > 0 ? me / ms : 0.0;
    state.counters["exact_TFLOPs"] =
        me > 0 ? cudabench::attention_flops(n, n, support_heads, d, d, ao.causal) / me * 1e-12 : 0.0;
    state.counters["R"] = rq;
    state.counters["C"] = ck;
    state.counters["err"] = err;
    state.counters["uniform_err"] = uniform_error(p, exact);
    state.counters["est_err"] = est;
    state.counters["repaired_rows"] = bad;
    state.counters["poly_rows"] = poly;
    state.counters["degree"] = degree;
    state.counters["r"] = double(r);
    state.counters["plan_ms"] = pe.plan_ms;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// Registration (k, then the support options, innermost: the data and plan caches keep the last one)

void add_conv(long n, long d, long k) {
  benchmark::RegisterBenchmark("BM_conv_cuda", BM_conv_cuda)
      ->ArgNames({"n", "d", "k"})
      ->Args({n, d, k})
      ->Iterations(iterations_for(n))
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

void add_support(long n, long d, long degree, long t_milli, long sketch) {
  benchmark::RegisterBenchmark("BM_support_cuda", BM_support_cuda)
      ->ArgNames({"n", "d", "deg", "T_milli", "sketch"})
      ->Args({n, d, degree, t_milli, sketch})
      ->Iterations(iterations_for(n))
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

void register_all() {
  for (long n : {4096, 16384, 65536})
    for (long d : {64, 128})
      for (long k : {4, 16, 64}) add_conv(n, d, k);
  // d = 64: degree 1 and 2 (r = 65, 2145), threshold 0.25 and 0.5
  for (long n : {4096, 16384, 65536})
    for (long g : {1, 2})
      for (long t : {250, 500}) add_support(n, 64, g, t, 0);
  // sketched degree 2 (r = 1 + d + m)
  add_support(16384, 64, 2, 250, 256);
  add_support(16384, 128, 2, 250, 256);
  // d = 128, degree 1 and 2 (r = 129, 8385)
  add_support(16384, 128, 1, 250, 0);
  add_support(65536, 128, 1, 500, 0);
  add_support(65536, 128, 2, 500, 0);
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return cudabench::run_main(argc, argv);
}

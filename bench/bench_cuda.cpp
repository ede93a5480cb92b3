// CUDA benchmarks (Google Benchmark, manual time measured with CUDA events on the context's stream;
// --benchmark_out=f.json --benchmark_out_format=json for JSON). Without a usable GPU every benchmark
// reports an error ("no usable CUDA device") instead of a time.
//
// BM_kv_up_projection_cuda<T>/tokens:<n>/epilogue:<e>/gather:<g>: the key (or value: same shape)
//   up-projection of a DeepSeek-V2-Lite MLA layer, latent 512 -> 16 heads x 128, storage T (fp16,
//   bf16), fp32 accumulation. Each iteration times, back to back on one stream,
//     dense: y = x W through cublasGemmEx (N = 2048, K = 512), the baseline;
//     bd:    bd::project, all heads in one pass (K = 384) with the basis channels added by epilogue
//            e (0 automatic, 1 cuBLASLt batched with the basis block as C, 2 prefill kernel + GEMM
//            with beta = 1); gather = 1 when the basis is not leading (gather kernel first).
//   Manual time = dense + bd; counters (medians over iterations): dense_us, bd_us,
//   ratio = dense_us / bd_us (FLOP limit 512 / 384 = 1.333; issue 4 asks >= 1.30 at 16K-64K tokens
//   in fp16), bd_TFLOPs (useful BD FLOPs, 2 tokens 384 2048, per second).
//   Weights are random with the model's shapes (the timing does not depend on the values).
// BM_attention_cuda<T>/n:<n>/causal:<c>: exact attention with DeepSeek-V2-Lite's MLA head dims
//   (16 heads, d_qk 192, d_v 128), n queries = n keys; counter TFLOPs (causal: half the work).
// BM_mla_layer_cuda<T>/tokens:<n>: the full forward pass of one DeepSeek-V2-Lite MLA attention layer
//   (bd::forward(ctx, device_mla_layer, ...): q and kv_a projections, latent RMSNorm, RoPE, K-nope and
//   V up-projections, key assembly, causal exact attention, o projection), dense vs BD (per-side
//   bases: the K up-projection reads the latent in place, the V side gathers), storage T (fp16,
//   bf16), default projection epilogue. Random weights with the model's shapes, prepared once per T
//   by prepare_mla (the BD factorization takes a few seconds). Each iteration times the dense and
//   the BD layer back to back with CUDA events; manual time = dense + BD; counters (medians):
//   dense_ms, bd_ms, ratio = dense_ms / bd_ms. BD only shortens the two up-projections, so at long
//   contexts the ratio tends to 1 as the (quadratic, not yet tensor-core) attention dominates.
#include <basisattn/bd/projection.hpp>
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/layers.hpp>
#include <basisattn/cuda/projection.hpp>

#include <benchmark/benchmark.h>

#include "cuda_bench_util.hpp"

#include "deepseek_shapes.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

using namespace basisattn;
namespace ds = deepseek_v2_lite;

namespace {

using cudabench::event_timer;
using cudabench::have_device;
using cudabench::median;

template <class T>
T from_f(float x) {
  return basisattn::detail::from_compute<T>(x);
}

/// Random device data of n elements, N(0, scale^2), generated on the host once.
template <class T>
device_buffer<T> random_device(const cuda_context& ctx, index_t n, float scale, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<T> h(static_cast<std::size_t>(n));
  for (auto& v : h) v = from_f<T>(nd(g));
  return to_device(ctx, h.data(), n);
}

/// The K-nope up-projection of one DeepSeek-V2-Lite layer, host side (random values, model shapes).
template <class T>
struct kv_up_host {
  bd::dense_projection<T> dense;
  bd::bd_projection<T> bd_leading, bd_gather;
  kv_up_host() {
    const index_t m = ds::kv_lora_rank, r = ds::qk_nope, G = ds::heads;
    std::mt19937_64 g(11);
    std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(float(m)));
    dense.weight = matrix<T>(m, G * r);
    for (index_t i = 0; i < dense.weight.size(); ++i) dense.weight.data()[i] = from_f<T>(nd(g));
    auto make = [&](bool leading) {
      bd::bd_projection<T> p;
      p.in_dim = m, p.rank = r, p.heads = G;
      std::vector<index_t> ch(static_cast<std::size_t>(m));
      std::iota(ch.begin(), ch.end(), index_t(0));
      if (!leading) std::shuffle(ch.begin(), ch.end(), g);
      p.basis.assign(ch.begin(), ch.begin() + r);
      p.rest.assign(ch.begin() + r, ch.end());
      p.coeff = matrix<T>(m - r, G * r);
      for (index_t i = 0; i < p.coeff.size(); ++i) p.coeff.data()[i] = from_f<T>(nd(g));
      return p;
    };
    bd_leading = make(true);
    bd_gather = make(false);
  }
};

template <class T>
void BM_kv_up_projection_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  static const kv_up_host<T> host;
  const index_t tokens = state.range(0);
  bd::cuda_project_options opt;
  opt.epilogue = static_cast<bd::cuda_epilogue>(state.range(1));
  const bool gather = state.range(2) != 0;
  const index_t m = ds::kv_lora_rank, out = ds::heads * ds::qk_nope;

  cuda_context ctx;
  const auto dense = bd::upload(ctx, host.dense);
  const auto bdp = bd::upload(ctx, gather ? host.bd_gather : host.bd_leading);
  const auto x = random_device<T>(ctx, tokens * m, 1.0f, 5);
  device_buffer<T> y(tokens * out);
  device_buffer<unsigned char> ws(static_cast<index_t>(std::max(bd::project_workspace_bytes(ctx, bdp, tokens, opt),
                                                                bd::project_workspace_bytes(ctx, dense, tokens, opt))));
  const matrix_view<const T> xv(x.data(), tokens, m);
  const matrix_view<T> yv(y.data(), tokens, out);
  try {  // warm-up: cuBLAS/cuBLASLt heuristics and the plan cache, module loading
    bd::project(ctx, dense, xv, yv, ws.data(), ws.bytes(), opt);
    bd::project(ctx, bdp, xv, yv, ws.data(), ws.bytes(), opt);
    ctx.synchronize();
  } catch (const basisattn::error& e) {
    state.SkipWithError(e.what());
    return;
  }
  event_timer td, tb;
  std::vector<double> sd, sb;
  for (auto _ : state) {
    td.start(ctx.stream());
    bd::project(ctx, dense, xv, yv, ws.data(), ws.bytes(), opt);
    td.stop(ctx.stream());
    tb.start(ctx.stream());
    bd::project(ctx, bdp, xv, yv, ws.data(), ws.bytes(), opt);
    tb.stop(ctx.stream());
    sd.push_back(td.seconds());
    sb.push_back(tb.seconds());
    state.SetIterationTime(sd.back() + sb.back());
  }
  const double md = median(sd), mb = median(sb);
  state.counters["dense_us"] = md * 1e6;
  state.counters["bd_us"] = mb * 1e6;
  state.counters["ratio"] = mb > 0 ? md / mb : 0.0;
  state.counters["bd_TFLOPs"] = mb > 0 ? 2.0 * double(tokens) * double(m - ds::qk_nope) * double(out) / mb * 1e-12 : 0.0;
  state.counters["dense_TFLOPs"] = md > 0 ? 2.0 * double(tokens) * double(m) * double(out) / md * 1e-12 : 0.0;
}

template <class T>
void BM_attention_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  const index_t n = state.range(0), h = ds::heads, dqk = ds::qk_nope + ds::qk_rope, dv = ds::v_head;
  attention_options opt;
  opt.causal = state.range(1) != 0;
  cuda_context ctx;
  const auto q = random_device<T>(ctx, n * h * dqk, 1.0f, 1);
  const auto k = random_device<T>(ctx, n * h * dqk, 1.0f, 2);
  const auto v = random_device<T>(ctx, n * h * dv, 1.0f, 3);
  device_buffer<T> o(n * h * dv);
  const tensor3_view<const T> qv(q.data(), n, h, dqk), kv(k.data(), n, h, dqk), vv(v.data(), n, h, dv);
  const tensor3_view<T> ov(o.data(), n, h, dv);
  attention<T>(ctx, qv, kv, vv, ov, opt);  // warm-up
  ctx.synchronize();
  event_timer t;
  std::vector<double> s;
  for (auto _ : state) {
    t.start(ctx.stream());
    attention<T>(ctx, qv, kv, vv, ov, opt);
    t.stop(ctx.stream());
    s.push_back(t.seconds());
    state.SetIterationTime(s.back());
  }
  const double flops = 2.0 * double(n) * double(n) * double(h) * double(dqk + dv) * (opt.causal ? 0.5 : 1.0);
  const double ms = median(s);
  state.counters["TFLOPs"] = ms > 0 ? flops / ms * 1e-12 : 0.0;
}

/// A DeepSeek-V2-Lite MLA layer prepared dense and BD on the host (random weights, model shapes).
template <class T>
struct mla_layers_host {
  bd::mla_layer<T> dense, bd_layer;
  mla_layers_host() {
    const ds::weights w(7);
    bd::mla_options dense_opt;
    dense_opt.bd = false;
    dense = bd::prepare_mla<T>(w.views(), ds::config(), dense_opt);
    bd_layer = bd::prepare_mla<T>(w.views(), ds::config());
  }
};

template <class T>
void BM_mla_layer_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  static const mla_layers_host<T> host;
  const index_t tokens = state.range(0), dm = ds::hidden;
  cuda_context ctx;
  const auto dense = bd::upload(ctx, host.dense);
  const auto bdl = bd::upload(ctx, host.bd_layer);
  const auto x = random_device<T>(ctx, tokens * dm, 1.0f, 9);
  device_buffer<T> y(tokens * dm);
  device_buffer<unsigned char> ws(static_cast<index_t>(
      std::max(bd::forward_workspace_bytes(ctx, dense, tokens), bd::forward_workspace_bytes(ctx, bdl, tokens))));
  const matrix_view<const T> xv(x.data(), tokens, dm);
  const matrix_view<T> yv(y.data(), tokens, dm);
  try {  // warm-up: cuBLAS/cuBLASLt heuristics and plan caches, module loading
    bd::forward(ctx, dense, xv, yv, ws.data(), ws.bytes());
    bd::forward(ctx, bdl, xv, yv, ws.data(), ws.bytes());
    ctx.synchronize();
  } catch (const basisattn::error& e) {
    state.SkipWithError(e.what());
    return;
  }
  event_timer td, tb;
  std::vector<double> sd, sb;
  for (auto _ : state) {
    td.start(ctx.stream());
    bd::forward(ctx, dense, xv, yv, ws.data(), ws.bytes());
    td.stop(ctx.stream());
    tb.start(ctx.stream());
    bd::forward(ctx, bdl, xv, yv, ws.data(), ws.bytes());
    tb.stop(ctx.stream());
    sd.push_back(td.seconds());
    sb.push_back(tb.seconds());
    state.SetIterationTime(sd.back() + sb.back());
  }
  const double md = median(sd), mb = median(sb);
  state.counters["dense_ms"] = md * 1e3;
  state.counters["bd_ms"] = mb * 1e3;
  state.counters["ratio"] = mb > 0 ? md / mb : 0.0;
}

void projection_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "epilogue", "gather"});
  for (long tokens : {1024, 4096, 16384, 65536}) {
    for (long epi : {0, 1, 2}) b->Args({tokens, epi, 0});
    b->Args({tokens, 0, 1});
  }
}

}  // namespace

BENCHMARK_TEMPLATE(BM_kv_up_projection_cuda, Eigen::half)
    ->Apply(projection_args)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_kv_up_projection_cuda, Eigen::bfloat16)
    ->Apply(projection_args)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_attention_cuda, Eigen::half)
    ->ArgNames({"n", "causal"})
    ->ArgsProduct({{1024, 4096, 16384}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_attention_cuda, Eigen::bfloat16)
    ->ArgNames({"n", "causal"})
    ->ArgsProduct({{4096}, {1}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_mla_layer_cuda, Eigen::half)
    ->ArgNames({"tokens"})
    ->Arg(1024)
    ->Arg(4096)
    ->Arg(16384)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_mla_layer_cuda, Eigen::bfloat16)
    ->ArgNames({"tokens"})
    ->Arg(1024)
    ->Arg(4096)
    ->Arg(16384)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();

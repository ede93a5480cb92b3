// CUDA benchmarks of BD projections, exact attention and whole MLA layers (Google Benchmark; times
// measured with CUDA events on the context's stream, reported as manual time; --benchmark_out=f.json
// --benchmark_out_format=json for JSON). Without a usable GPU every benchmark reports the error
// "no usable CUDA device" and the program exits 0 within a second or so.
//
// Measurement rules (all benchmarks here):
//   * every timed region is preceded, outside its events, by an L2 flush: cudaMemsetAsync over a
//     scratch buffer of 2 x cudaDevAttrL2CacheSize bytes (cudabench::l2_flusher), so each region reads
//     its inputs and weights from HBM, as a layer in a real model does;
//   * where two things are compared (dense vs BD) each has its own pair of events, and the order
//     alternates: even iterations run dense first, odd iterations BD first;
//   * fixed iteration counts (->Iterations(n), below), so the default run's GPU time is bounded; the
//     counters are medians over those iterations. Google Benchmark's own time column is the mean of
//     the per-iteration manual times (for a pair: dense + BD);
//   * a warm-up call before the loop (module loading, cuBLAS / cuBLASLt heuristics, plan caches; for
//     BM_attention_cuda on the first 256 tokens only: same kernel, no heuristics to warm);
//   * setup_s: host seconds from the start of the benchmark to the loop (context, data, uploads,
//     warm-up; the first benchmark of a type also makes its host weights / layers).
//   * random inputs: 4M values per type made once on the host (uniform, mean 0, variance 1; fast
//     splitmix64), repeated on the device (cudabench::random_device); timings do not depend on them.
//   The JSON context carries the device (cuda_device, cuda_sm_count, cuda_l2_bytes, ...).
//   Type names: fp16 = Eigen::half, bf16 = Eigen::bfloat16, fp32 = float; fp32 accumulation always.
//   Google Benchmark appends /iterations:<n>/manual_time to every name below.
//
// BM_kv_up_projection_cuda<T>/tokens:<n>/epilogue:<e>/gather:<g>   (T: fp16, bf16; one fp32 point)
//   The K (or V: same shape) up-projection of a DeepSeek-V2-Lite MLA layer: latent 512 -> 16 heads x
//   128, no bias, random weights of the model's shapes.
//     dense: y = x W through bd::project on the dense projection (no bias: one cublasGemmEx,
//            N = 2048, K = 512), the baseline;
//     bd:    bd::project on the BD projection, all heads in one pass (K = 384), the basis channels
//            added by epilogue e requested (0 automatic, 1 cublaslt: cuBLASLt batched over heads with
//            the basis block as C, 2 prefill: broadcast kernel + GEMM with beta = 1); gather = 1:
//            basis not leading (a gather kernel copies x[:, basis ++ rest] first), 0: basis leading.
//   Counters (medians over iterations):
//     dense_us, bd_us          event time of each
//     ratio                    dense_us / bd_us; FLOP limit 512 / 384 = 1.333 (the target is >= 1.30
//                              at 16K-64K tokens in fp16)
//     dense_TFLOPs, bd_TFLOPs  useful FLOPs per second: dense 2 n 512 2048, BD 2 n 384 2048
//     dense_GBs, bd_GBs        fewest bytes / time: (x + weights + y) once each: dense
//                              (512 n + 512 2048 + 2048 n) s, BD (512 n + 384 2048 + 2048 n) s, s the
//                              element size (the gather's extra pass over x not counted)
//     dense_method, bd_method  the method bd::project reports it ran (0 none = plain cublasGemmEx,
//                              1 cublaslt, 2 prefill): a silent fallback of automatic shows here; the
//                              label says the same in words
//     setup_s
//   Ceilings on an H200 (~790 TFLOP/s bf16/fp16 dense GEMM, ~4.3 TB/s): both GEMMs are compute-bound
//   (dense ~2.1 MFLOP per token against ~5.1 kB per token in fp16, BD 1.6 MFLOP against 5.1 kB;
//   machine balance ~184 FLOP/B), floors at 65536 tokens ~174 us dense and ~130 us BD.
//
// BM_attention_cuda<T>/n:<n>/causal:<c>/dqk:<a>/dv:<b>/heads:<h>   (T: fp16, bf16)
//   Exact attention (basisattn::attention(ctx, ...)), n queries = n keys, h query = kv heads, head dims
//   d_qk = a, d_v = b: DeepSeek-V2-Lite MLA (16 heads, 192 / 128) and Llama-like (d 128 / 128; 16
//   heads, not Llama's 32: the kernel's throughput depends on the head dims, and 16 heads already
//   give n / 16 x 16 >= 4096 blocks, while 32 would double the longest runs). Counters:
//     ms       median event time
//     TFLOPs   2 * pairs * h * (d_qk + d_v) / time, pairs = n^2, or causal the exact count of visible
//              (query, key) pairs, n (n + 1) / 2 (softmax not counted: FlashAttention's convention)
//     GFLOP    that FLOP count / 1e9
//     setup_s
//   Ceiling: the current kernel uses no tensor cores (fp32 FMAs reading shared memory, ~38 FLOPs per
//   shared-memory wavefront: at most ~9 TFLOP/s on an H200; expect 3-6).
//
// BM_mla_layer_cuda<T>/tokens:<n>   (T: fp16, bf16)
//   The full forward pass of one DeepSeek-V2-Lite MLA attention layer (bd::forward(ctx,
//   device_mla_layer, ...): q and kv_a projections, latent RMSNorm, RoPE, K-nope and V
//   up-projections, key assembly, causal exact attention, o projection), dense vs BD (default
//   prepare_mla: per-side bases, the K up-projection reads the latent in place, the V side gathers),
//   default projection epilogue. Random weights of the model's shapes, prepared once per T by
//   prepare_mla (the BD factorization: ~1 s of host time per T on 2 cores). Counters (medians):
//   dense_ms, bd_ms, ratio = dense_ms / bd_ms, setup_s. BD only shortens the two up-projections, so
//   at long contexts the ratio tends to 1 as the quadratic attention dominates.
//
// Default run (no filter) and its estimated GPU time on an H200, from the FLOP counts above at the
// projections' ceilings and an assumed ~4 TFLOP/s of the attention kernel (at 2 TFLOP/s the attention
// parts double). Per iteration: a flush (~40 us) + the timed work + one host sync.
//   projections: fp16, bf16 x tokens 4096 / 16384 / 65536 x {e 0, 1, 2 leading; e 0 gathered},
//     plus fp32 tokens 16384 e 0 leading: 25 benchmarks x 100 iterations, <= 0.6 ms each
//                                                                        ~1 s   (+ ~0.1 s setup each)
//   attention n 4096 (10 iterations) and 16384 (3), causal, fp16 and bf16, MLA and d 128:
//     MLA 4096 ~22 ms, 16384 ~0.34 s; d128 4096 ~17 ms, 16384 ~0.27 s per call  ~4.5 s
//   attention non-causal, fp16 MLA, n 4096 (10) and 16384 (3): 43 ms, 0.69 s    ~2.5 s
//   MLA layers fp16 and bf16, tokens 1024 (20 iterations), 4096 (10), 16384 (3): each iteration two
//     forwards, ~2 ms / ~45 ms / ~0.7 s (the causal attention)                ~7 s (+ ~3 s host prep)
//   attention n 65536 causal, 1 iteration, fp16 and bf16: MLA 2.2e13 FLOP ~5.5 s, d128 1.8e13 ~4.4 s
//                                                                        ~20 s (run last)
//   total ~35 s of GPU time (~65 s at 2 TFLOP/s) + ~10 s of host setup and CUDA start-up.
#include <basisattn/bd/projection.hpp>
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/layers.hpp>
#include <basisattn/cuda/projection.hpp>

#include <benchmark/benchmark.h>

#include "cuda_bench_util.hpp"

#include "deepseek_shapes.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

using namespace basisattn;
namespace ds = deepseek_v2_lite;

namespace {

using cudabench::event_timer;
using cudabench::have_device;
using cudabench::l2_flusher;
using cudabench::median;
using cudabench::random_device;
using cudabench::seconds_since;
using cudabench::timed_pairs;
using steady = std::chrono::steady_clock;

template <class T>
std::string type_name() {
  if constexpr (std::is_same_v<T, Eigen::half>)
    return "fp16";
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return "bf16";
  else
    return "fp32";
}

/// The counter value of a projection method: 0 none (plain cublasGemmEx), 1 cublaslt, 2 prefill.
double method_code(bd::cuda_epilogue e) {
  switch (e) {
    case bd::cuda_epilogue::none:
      return 0;
    case bd::cuda_epilogue::cublaslt:
      return 1;
    case bd::cuda_epilogue::prefill:
      return 2;
    case bd::cuda_epilogue::automatic:
      break;
  }
  return -1;  // never returned by bd::project
}

// ---------------------------------------------------------------------------------------------------
// K up-projection: dense vs BD

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
    for (index_t i = 0; i < dense.weight.size(); ++i) dense.weight.data()[i] = T(nd(g));
    auto make = [&](bool leading) {
      bd::bd_projection<T> p;
      p.in_dim = m, p.rank = r, p.heads = G;
      std::vector<index_t> ch(static_cast<std::size_t>(m));
      std::iota(ch.begin(), ch.end(), index_t(0));
      if (!leading) std::shuffle(ch.begin(), ch.end(), g);
      p.basis.assign(ch.begin(), ch.begin() + r);
      p.rest.assign(ch.begin() + r, ch.end());
      p.coeff = matrix<T>(m - r, G * r);
      for (index_t i = 0; i < p.coeff.size(); ++i) p.coeff.data()[i] = T(nd(g));
      return p;
    };
    bd_leading = make(true);
    bd_gather = make(false);
  }
};

template <class T>
void BM_kv_up_projection_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  const auto t0 = steady::now();
  const index_t tokens = state.range(0);
  bd::cuda_project_options opt;
  opt.epilogue = static_cast<bd::cuda_epilogue>(state.range(1));
  const bool gather = state.range(2) != 0;
  const index_t m = ds::kv_lora_rank, r = ds::qk_nope, out = ds::heads * ds::qk_nope;
  try {
    static const kv_up_host<T> host;
    cuda_context ctx;
    l2_flusher l2;
    const auto dense = bd::upload(ctx, host.dense);
    const auto bdp = bd::upload(ctx, gather ? host.bd_gather : host.bd_leading);
    const auto x = random_device<T>(ctx, tokens * m, 5);
    device_buffer<T> y(tokens * out);
    device_buffer<unsigned char> ws(static_cast<index_t>(
        std::max(bd::workspace_bytes(ctx, bdp, tokens, opt), bd::workspace_bytes(ctx, dense, tokens, opt))));
    const matrix_view<const T> xv(x.data(), tokens, m);
    const matrix_view<T> yv(y.data(), tokens, out);
    // warm-up: cuBLAS/cuBLASLt heuristics and the plan cache, module loading
    bd::cuda_epilogue dense_method = bd::project(ctx, dense, xv, yv, ws.data(), ws.bytes(), opt);
    bd::cuda_epilogue bd_method = bd::project(ctx, bdp, xv, yv, ws.data(), ws.bytes(), opt);
    ctx.synchronize();
    state.counters["setup_s"] = seconds_since(t0);

    std::vector<double> sd, sb;
    timed_pairs(
        state, ctx, l2, [&] { dense_method = bd::project(ctx, dense, xv, yv, ws.data(), ws.bytes(), opt); },
        [&] { bd_method = bd::project(ctx, bdp, xv, yv, ws.data(), ws.bytes(), opt); }, sd, sb);
    const double md = median(sd), mb = median(sb), es = double(sizeof(T)), n = double(tokens);
    const double dense_flops = 2.0 * n * double(m) * double(out), bd_flops = 2.0 * n * double(m - r) * double(out);
    const double dense_bytes = (n * double(m) + double(m) * double(out) + n * double(out)) * es;
    const double bd_bytes = (n * double(m) + double(m - r) * double(out) + n * double(out)) * es;
    state.counters["dense_us"] = md * 1e6;
    state.counters["bd_us"] = mb * 1e6;
    state.counters["ratio"] = mb > 0 ? md / mb : 0.0;
    state.counters["dense_TFLOPs"] = md > 0 ? dense_flops / md * 1e-12 : 0.0;
    state.counters["bd_TFLOPs"] = mb > 0 ? bd_flops / mb * 1e-12 : 0.0;
    state.counters["dense_GBs"] = md > 0 ? dense_bytes / md * 1e-9 : 0.0;
    state.counters["bd_GBs"] = mb > 0 ? bd_bytes / mb * 1e-9 : 0.0;
    state.counters["dense_method"] = method_code(dense_method);
    state.counters["bd_method"] = method_code(bd_method);
    state.SetLabel(std::string("dense:") + bd::to_string(dense_method) + " bd:" + bd::to_string(bd_method));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// Exact attention

template <class T>
void BM_attention_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  const auto t0 = steady::now();
  const index_t n = state.range(0), dqk = state.range(2), dv = state.range(3), h = state.range(4);
  attention_options opt;
  opt.causal = state.range(1) != 0;
  try {
    cuda_context ctx;
    l2_flusher l2;
    const auto q = random_device<T>(ctx, n * h * dqk, 1);
    const auto k = random_device<T>(ctx, n * h * dqk, 2);
    const auto v = random_device<T>(ctx, n * h * dv, 3);
    device_buffer<T> o(n * h * dv);
    const tensor3_view<const T> qv(q.data(), n, h, dqk), kv(k.data(), n, h, dqk), vv(v.data(), n, h, dv);
    const tensor3_view<T> ov(o.data(), n, h, dv);
    {  // warm-up on the first 256 tokens (module loading, the shared-memory opt-in): same kernel
      const index_t w = std::min<index_t>(n, 256);
      attention<T>(ctx, tensor3_view<const T>(q.data(), w, h, dqk), tensor3_view<const T>(k.data(), w, h, dqk),
                   tensor3_view<const T>(v.data(), w, h, dv), tensor3_view<T>(o.data(), w, h, dv), opt);
      ctx.synchronize();
    }
    state.counters["setup_s"] = seconds_since(t0);
    event_timer t;
    std::vector<double> s;
    for (auto _ : state) {
      l2.flush(ctx.stream());
      t.start(ctx.stream());
      attention<T>(ctx, qv, kv, vv, ov, opt);
      t.stop(ctx.stream());
      s.push_back(t.seconds());
      state.SetIterationTime(s.back());
    }
    const double flops = cudabench::attention_flops(n, n, h, dqk, dv, opt.causal);
    const double ms = median(s);
    state.counters["ms"] = ms * 1e3;
    state.counters["TFLOPs"] = ms > 0 ? flops / ms * 1e-12 : 0.0;
    state.counters["GFLOP"] = flops * 1e-9;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// Whole MLA layer: dense vs BD

/// A DeepSeek-V2-Lite MLA layer prepared dense and BD on the host (random weights, model shapes).
template <class T>
struct mla_layers_host {
  bd::mla_layer<T> dense, bd_layer;
  double prepare_s = 0;
  mla_layers_host() {
    const auto t0 = steady::now();
    const ds::weights w(7);
    bd::mla_options dense_opt;
    dense_opt.bd = false;
    dense = bd::prepare_mla<T>(w.views(), ds::config(), dense_opt);
    bd_layer = bd::prepare_mla<T>(w.views(), ds::config());
    prepare_s = seconds_since(t0);
  }
};

template <class T>
void BM_mla_layer_cuda(benchmark::State& state) {
  if (!have_device(state)) return;
  const auto t0 = steady::now();
  const index_t tokens = state.range(0), dm = ds::hidden;
  try {
    static const mla_layers_host<T> host;
    cuda_context ctx;
    l2_flusher l2;
    const auto dense = bd::upload(ctx, host.dense);
    const auto bdl = bd::upload(ctx, host.bd_layer);
    const auto x = random_device<T>(ctx, tokens * dm, 9);
    device_buffer<T> y(tokens * dm);
    device_buffer<unsigned char> ws(
        static_cast<index_t>(std::max(bd::workspace_bytes(ctx, dense, tokens), bd::workspace_bytes(ctx, bdl, tokens))));
    const matrix_view<const T> xv(x.data(), tokens, dm);
    const matrix_view<T> yv(y.data(), tokens, dm);
    // warm-up: cuBLAS/cuBLASLt heuristics and plan caches, module loading
    bd::forward(ctx, dense, xv, yv, ws.data(), ws.bytes());
    bd::forward(ctx, bdl, xv, yv, ws.data(), ws.bytes());
    ctx.synchronize();
    state.counters["setup_s"] = seconds_since(t0);

    std::vector<double> sd, sb;
    timed_pairs(
        state, ctx, l2, [&] { bd::forward(ctx, dense, xv, yv, ws.data(), ws.bytes()); },
        [&] { bd::forward(ctx, bdl, xv, yv, ws.data(), ws.bytes()); }, sd, sb);
    const double md = median(sd), mb = median(sb);
    state.counters["dense_ms"] = md * 1e3;
    state.counters["bd_ms"] = mb * 1e3;
    state.counters["ratio"] = mb > 0 ? md / mb : 0.0;
    state.counters["prepare_s"] = host.prepare_s;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// Registration (in this order; the longest runs last)

template <class T>
void add_projection(long tokens, long epilogue, long gather, int iterations) {
  const std::string name = "BM_kv_up_projection_cuda<" + type_name<T>() + ">";
  benchmark::RegisterBenchmark(name.c_str(), BM_kv_up_projection_cuda<T>)
      ->ArgNames({"tokens", "epilogue", "gather"})
      ->Args({tokens, epilogue, gather})
      ->Iterations(iterations)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

/// Iterations of an attention run of n tokens (bounded GPU time: ~0.2 / ~1 / ~5 s per benchmark).
int attention_iterations(long n) { return n <= 4096 ? 10 : n <= 16384 ? 3 : 1; }

template <class T>
void add_attention(long n, long causal, long dqk, long dv, long heads) {
  const std::string name = "BM_attention_cuda<" + type_name<T>() + ">";
  benchmark::RegisterBenchmark(name.c_str(), BM_attention_cuda<T>)
      ->ArgNames({"n", "causal", "dqk", "dv", "heads"})
      ->Args({n, causal, dqk, dv, heads})
      ->Iterations(attention_iterations(n))
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

template <class T>
void add_mla_layer(long tokens) {
  const std::string name = "BM_mla_layer_cuda<" + type_name<T>() + ">";
  benchmark::RegisterBenchmark(name.c_str(), BM_mla_layer_cuda<T>)
      ->ArgNames({"tokens"})
      ->Args({tokens})
      ->Iterations(tokens <= 1024   ? 20
                   : tokens <= 4096 ? 10
                                    : 3)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

template <class T>
void add_projections() {
  for (long tokens : {4096, 16384, 65536}) {
    for (long e : {0, 1, 2}) add_projection<T>(tokens, e, 0, 100);  // basis leading: automatic, cublaslt, prefill
    add_projection<T>(tokens, 0, 1, 100);                           // gathered basis, automatic
  }
}

/// Causal exact attention at n tokens: MLA head dims, then Llama-like d 128.
template <class T>
void add_causal_attention(long n) {
  add_attention<T>(n, 1, ds::qk_nope + ds::qk_rope, ds::v_head, ds::heads);
  add_attention<T>(n, 1, 128, 128, 16);
}

void register_all() {
  add_projections<Eigen::half>();
  add_projections<Eigen::bfloat16>();
  add_projection<float>(16384, 0, 0, 100);
  for (long n : {4096, 16384}) add_causal_attention<Eigen::half>(n);
  for (long n : {4096, 16384}) add_causal_attention<Eigen::bfloat16>(n);
  for (long n : {4096, 16384}) add_attention<Eigen::half>(n, 0, ds::qk_nope + ds::qk_rope, ds::v_head, ds::heads);
  for (long tokens : {1024, 4096, 16384}) add_mla_layer<Eigen::half>(tokens);
  for (long tokens : {1024, 4096, 16384}) add_mla_layer<Eigen::bfloat16>(tokens);
  add_causal_attention<Eigen::half>(65536);  // the longest runs (seconds each) last
  add_causal_attention<Eigen::bfloat16>(65536);
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return cudabench::run_main(argc, argv);
}

// BD benchmarks (Google Benchmark; --benchmark_out=f.json --benchmark_out_format=json for JSON).
//
// BM_kv_up_projection/<tokens>/<threads>: the key up-projection of a DeepSeek-V2-Lite MLA layer
//   (latent 512 -> 16 heads x 128, fp32), dense (x W, inner dimension 512) against BD (basis copy +
//   x_rest C, inner dimension 384, latent permuted at preparation so no gather), both through
//   bd::project in the same iteration. Counters: dense_ms, bd_ms (median over iterations) and
//   ratio = dense_ms / bd_ms (FLOP limit 512 / 384 = 1.333).
// BM_kv_up_projection_gather: the same with the basis channels gathered (input not permuted).
// BM_prepare_model<T>/<threads>: BD preparation of all 27 MLA layers of a DeepSeek-V2-Lite shaped
//   model (random weights of the right shapes; K-nope and V sides, one basis each per layer,
//   absorbed into q_proj and o_proj; storage T), layers prepared in parallel on <threads> threads.
// BM_factorize_model<T>/<threads>: the basis choice + factorization part of that alone.
#include <basisattn/bd/layers.hpp>
#include <basisattn/cpu/projection.hpp>

#include <benchmark/benchmark.h>

#include "deepseek_shapes.hpp"

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace basisattn;
namespace ds = deepseek_v2_lite;

namespace {

void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n);
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// The K-nope up-projection of one layer, dense and BD, prepared once.
struct kv_up {
  bd::dense_projection<float> dense;
  bd::bd_projection<float> bd;
  explicit kv_up(bool permuted) {
    const ds::weights w(1);
    const auto layer = bd::prepare_mla<float>(w.views(), ds::config());
    bd = std::get<bd::bd_projection<float>>(layer.k_up);
    if (!permuted) {  // undo the latent permutation: the basis must be gathered from x
      const auto sb = bd::factorize<float>([&] {
        std::vector<matrix_view<const float>> heads;
        const auto v = w.views();
        for (index_t h = 0; h < ds::heads; ++h)
          heads.push_back(v.wkv_b.block(0, h * (ds::qk_nope + ds::v_head), ds::kv_lora_rank, ds::qk_nope));
        return heads;
      }());
      bd = bd::make_bd_projection<float>(sb);
    }
    dense = bd::make_dense_projection<float>(w.k_up_weight().view());
  }
};

void run_projection(benchmark::State& state, bool permuted) {
  static const kv_up leading(true), gathered(false);
  const kv_up& p = permuted ? leading : gathered;
  const index_t tokens = state.range(0);
  set_threads(static_cast<int>(state.range(1)));
  matrix<float> x(tokens, ds::kv_lora_rank), y(tokens, ds::heads * ds::qk_nope);
  std::mt19937 g(7);
  std::normal_distribution<float> nd;
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
  std::vector<unsigned char> ws(
      std::max(bd::workspace_bytes(cpu{}, p.bd, tokens), bd::workspace_bytes(cpu{}, p.dense, tokens)) + 64);
  bd::project_options po;
  po.check_finite = false;  // time the projections alone
  std::vector<double> td, tb;
  for (auto _ : state) {
    auto t = std::chrono::steady_clock::now();
    bd::project(cpu{}, p.dense, x.view(), y.view(), ws.data(), ws.size(), po);
    benchmark::ClobberMemory();
    td.push_back(seconds_since(t));
    t = std::chrono::steady_clock::now();
    bd::project(cpu{}, p.bd, x.view(), y.view(), ws.data(), ws.size(), po);
    benchmark::ClobberMemory();
    tb.push_back(seconds_since(t));
    state.SetIterationTime(td.back() + tb.back());
  }
  const double md = median(td), mb = median(tb);
  state.counters["dense_ms"] = md * 1e3;
  state.counters["bd_ms"] = mb * 1e3;
  state.counters["ratio"] = md / mb;
  state.counters["dense_GFLOPs"] = 2.0 * double(tokens) * ds::kv_lora_rank * ds::heads * ds::qk_nope / md * 1e-9;
  set_threads(1);
}

void BM_kv_up_projection(benchmark::State& s) { run_projection(s, true); }
void BM_kv_up_projection_gather(benchmark::State& s) { run_projection(s, false); }

/// All 27 layers, each step `one_layer(l)`, layers spread over `threads` threads (the library's own
/// parallel loops run single-threaded inside this region).
template <class F>
void time_model(benchmark::State& state, int threads, F&& one_layer) {
  for (auto _ : state) {
    const auto t = std::chrono::steady_clock::now();
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) num_threads(threads)
#endif
    for (index_t l = 0; l < ds::layers; ++l) one_layer(l);
    state.SetIterationTime(seconds_since(t));
  }
  (void)threads;
}

const ds::weights& model_weights() {
  static const ds::weights w(2);
  return w;
}

/// Full BD preparation of the model: prepare_mla (copy, basis choice, factorization, absorbing A_S
/// into q_proj and o_proj, latent permutation) for every layer. Storage type T.
template <class T>
void BM_prepare_model(benchmark::State& state) {
  const auto views = model_weights().views();
  time_model(state, static_cast<int>(state.range(0)), [&](index_t) {
    const auto layer = bd::prepare_mla<T>(views, ds::config());
    benchmark::DoNotOptimize(layer.q.weight.data());
  });
}

/// The basis choice and factorization alone (bd::factorize of the 16 K-nope heads and of the 16 V
/// heads of every layer, as prepare_mla does by default): BD's own algorithm, the rest of the
/// preparation being the A_S products absorbed into q_proj and o_proj, and copies.
template <class T>
void BM_factorize_model(benchmark::State& state) {
  const auto views = model_weights().views();
  time_model(state, static_cast<int>(state.range(0)), [&](index_t) {
    for (index_t side = 0; side < 2; ++side) {
      std::vector<matrix_view<const float>> heads;
      for (index_t h = 0; h < ds::heads; ++h)
        heads.push_back(
            views.wkv_b.block(0, h * (ds::qk_nope + ds::v_head) + side * ds::qk_nope, ds::kv_lora_rank, ds::qk_nope));
      const auto sb = bd::factorize<T>(heads);
      benchmark::DoNotOptimize(sb.basis().data());
    }
  });
}

}  // namespace

BENCHMARK(BM_kv_up_projection)
    ->ArgNames({"tokens", "threads"})
    ->ArgsProduct({{512, 4096, 32768}, {1, 2}})
    ->MinTime(2.0)  // enough alternating pairs for a stable median ratio on a noisy machine
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_kv_up_projection_gather)
    ->ArgNames({"tokens", "threads"})
    ->Args({4096, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_prepare_model, Eigen::half)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kSecond)
    ->Iterations(2);
BENCHMARK_TEMPLATE(BM_prepare_model, float)
    ->ArgName("threads")
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kSecond)
    ->Iterations(2);
BENCHMARK_TEMPLATE(BM_factorize_model, Eigen::half)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kSecond)
    ->Iterations(2);
BENCHMARK_MAIN();

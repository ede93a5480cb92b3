// BD benchmarks (Google Benchmark; --benchmark_out=f.json --benchmark_out_format=json for JSON).
//
// BM_kv_up_projection/<tokens>/<threads>: the key up-projection of a DeepSeek-V2-Lite MLA layer
//   (latent 512 -> 16 heads x 128, fp32): our dense projection (x W, inner dimension 512), Eigen's
//   GEMM alone (y = x W, the fastest dense GEMM in this binary) and BD (basis copy + x_rest C, inner
//   dimension 384, latent permuted at preparation so no gather), each once per iteration, the order
//   cycling through all six permutations. Counters (medians over iterations):
//     peak_GFLOPs       the fp32 FMA peak of <threads> threads, measured in this process (cpu_peak.hpp)
//     dense_ms, gemm_ms, bd_ms; dense_GFLOPs, gemm_GFLOPs, bd_GFLOPs (each its own FLOPs: 2 n 512 2048
//                       dense, 2 n 384 2048 BD); *_peak = GFLOP/s / peak_GFLOPs
//     ratio = dense_ms / bd_ms; ratio_fastest = min(dense_ms, gemm_ms) / bd_ms (FLOP limit 512 / 384
//                       = 1.333)
// BM_kv_up_projection_gather: the same with the basis channels gathered (input not permuted).
// BM_prepare_model<T>/<threads>: BD preparation of all 27 MLA layers of a DeepSeek-V2-Lite shaped
//   model (random weights of the right shapes; K-nope and V sides, one basis each per layer,
//   absorbed into q_proj and o_proj; storage T), layers prepared in parallel on <threads> threads.
// BM_factorize_model<T>/<threads>: the basis choice + factorization part of that alone.
#include <basisattn/bd/layers.hpp>
#include <basisattn/cpu/projection.hpp>

#include <benchmark/benchmark.h>

#include "cpu_peak.hpp"
#include "deepseek_shapes.hpp"

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
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

using bench_util::median;
using bench_util::seconds_since;

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

/// The fp32 peak of `threads` threads, measured once per thread count in this process.
double peak_gflops(int threads) {
  static std::map<int, double> cache;
  auto it = cache.find(threads);
  if (it == cache.end()) it = cache.emplace(threads, bench_util::fp32_peak_gflops(threads)).first;
  return it->second;
}

void run_projection(benchmark::State& state, bool permuted) {
  static const kv_up leading(true), gathered(false);
  const kv_up& p = permuted ? leading : gathered;
  const index_t tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  const double peak = peak_gflops(threads);
  matrix<float> x(tokens, ds::kv_lora_rank), y(tokens, ds::heads * ds::qk_nope);
  std::mt19937 g(7);
  std::normal_distribution<float> nd;
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
  std::vector<unsigned char> ws(
      std::max(bd::workspace_bytes(cpu{}, p.bd, tokens), bd::workspace_bytes(cpu{}, p.dense, tokens)) + 64);
  bd::project_options po;
  po.check_finite = false;  // time the projections alone
  using rm = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const rm> xm(x.data(), tokens, ds::kv_lora_rank),
      wm(p.dense.weight.data(), p.dense.in_dim(), p.dense.out_dim());
  Eigen::Map<rm> ym(y.data(), tokens, p.dense.out_dim());
  // Three contestants, in all six orders in turn (none always runs first on warm data): our dense
  // projection, Eigen's GEMM alone (y = x W: the fastest dense GEMM in this binary), and BD.
  const std::function<void()> run[3] = {
      [&] { bd::project(cpu{}, p.dense, x.view(), y.view(), ws.data(), ws.size(), po); },
      [&] { ym.noalias() = xm * wm; }, [&] { bd::project(cpu{}, p.bd, x.view(), y.view(), ws.data(), ws.size(), po); }};
  static constexpr int orders[6][3] = {{0, 1, 2}, {2, 1, 0}, {1, 2, 0}, {0, 2, 1}, {2, 0, 1}, {1, 0, 2}};
  for (int k = 0; k < 3; ++k) run[k]();  // warm-up
  std::vector<double> t[3];
  int round = 0;
  for (auto _ : state) {
    double total = 0;
    for (int k : orders[round % 6]) {
      const auto t0 = std::chrono::steady_clock::now();
      run[k]();
      benchmark::ClobberMemory();
      t[k].push_back(seconds_since(t0));
      total += t[k].back();
    }
    ++round;
    state.SetIterationTime(total);
  }
  const double md = median(t[0]), me = median(t[1]), mb = median(t[2]);
  const double dense_flop = 2.0 * double(tokens) * ds::kv_lora_rank * ds::heads * ds::qk_nope;
  const double bd_flop = 2.0 * double(tokens) * (ds::kv_lora_rank - ds::qk_nope) * ds::heads * ds::qk_nope;
  state.counters["peak_GFLOPs"] = peak;
  state.counters["dense_ms"] = md * 1e3;
  state.counters["gemm_ms"] = me * 1e3;
  state.counters["bd_ms"] = mb * 1e3;
  state.counters["dense_GFLOPs"] = dense_flop / md * 1e-9;
  state.counters["gemm_GFLOPs"] = dense_flop / me * 1e-9;
  state.counters["bd_GFLOPs"] = bd_flop / mb * 1e-9;
  state.counters["dense_peak"] = dense_flop / md * 1e-9 / peak;
  state.counters["gemm_peak"] = dense_flop / me * 1e-9 / peak;
  state.counters["bd_peak"] = bd_flop / mb * 1e-9 / peak;
  state.counters["ratio"] = md / mb;                        // against our dense projection
  state.counters["ratio_fastest"] = std::min(md, me) / mb;  // against the fastest dense GEMM here
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

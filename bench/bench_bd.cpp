// BD benchmarks (Google Benchmark; --benchmark_out=f.json --benchmark_out_format=json for JSON).
//
// BM_kv_up_projection/<tokens>/<threads>: the key up-projection of a DeepSeek-V2-Lite MLA layer
//   (latent 512 -> 16 heads x 128, fp32): our dense projection (x W, inner dimension 512, through the
//   build's GEMM provider), each bare GEMM y = x W this binary has (Eigen's as `gemm`; oneDNN's
//   dnnl_sgemm as `onednn` when built with BASISATTN_WITH_ONEDNN) and BD (basis copy + x_rest C,
//   inner dimension 384, latent permuted at preparation so no gather), each once per iteration, the
//   order rotating through every start and both directions. Counters (medians over iterations):
//     peak_GFLOPs       the fp32 FMA peak of <threads> threads, measured in this process (cpu_peak.hpp)
//     <name>_ms, <name>_GFLOPs (each its own FLOPs: 2 n 512 2048 dense, 2 n 384 2048 BD),
//                       <name>_peak = GFLOP/s / peak_GFLOPs, for name in dense, gemm, onednn, bd
//     ratio = dense_ms / bd_ms; ratio_fastest = (fastest of the dense contestants) / bd_ms (FLOP
//                       limit 512 / 384 = 1.333)
// BM_kv_up_projection_gather: the same with the basis channels gathered (input not permuted).
// BM_kv_up_projection_bf16/<tokens>/<threads>: the same BD projection with bf16 weights and
//   activations (coefficients rounded from the fp32 ones) against fp32 BD, in alternating order:
//   bd_fp32_ms, bd_ms (bf16), ratio_fp32 = bd_fp32_ms / bd_ms, bd_peak (against the fp32 peak), and
//   bf16_dot = 1 when the binary uses the AVX512_BF16 GEMM (detail::bf16_dot_available), 0 when it
//   converts to float around the float GEMM.
// BM_gqa_kv_projection/<shape>/<tokens>/<threads>: a GQA K (or V) projection, fp32, random weights:
//   shape 0 SmolLM2-135M (d_model 576 -> 3 kv heads x 64), shape 1 Llama-3-8B (4096 -> 8 x 128),
//   shape 2 all-MiniLM-L6-v2 (MHA: 384 -> 12 x 32).
//   Contestants, alternating: our dense projection, the bare GEMMs (as above), BD with one basis for
//   all kv heads (one gather + GEMM) and BD with a basis per kv head (one gather + GEMM per kv head:
//   what basis_grouping::automatic chooses on the real models). Counters: <name>_ms, <name>_peak,
//   ratio_shared and ratio_per_head = fastest dense / BD (FLOP limit d_model / (d_model - head_dim)),
//   per_head_cost = per-head ms / shared ms (the price of per-kv-head bases).
// BM_prepare_model<T>/<threads>/<error_aware>: BD preparation of all 27 MLA layers of a
//   DeepSeek-V2-Lite shaped model (random weights of the right shapes; K-nope and V sides, one basis
//   each per layer, absorbed into q_proj and o_proj; storage T), layers prepared in parallel on
//   <threads> threads, with the default error-aware rounding (1) or rounding::nearest (0).
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
#include <string>
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

/// Alternating-order timing of contestants (every start, both directions); returns median seconds.
std::vector<double> time_alternating(benchmark::State& state, std::vector<std::function<void()>> run) {
  const int n = static_cast<int>(run.size());
  std::vector<std::vector<double>> t(run.size());
  for (auto& f : run) f();  // warm-up
  int round = 0;
  for (auto _ : state) {
    double total = 0;
    const int start = round % n, dir = (round / n) % 2 ? -1 : 1;
    for (int i = 0; i < n; ++i) {
      const auto k = static_cast<std::size_t>(((start + dir * i) % n + n) % n);
      const auto t0 = std::chrono::steady_clock::now();
      run[k]();
      benchmark::ClobberMemory();
      t[k].push_back(seconds_since(t0));
      total += t[k].back();
    }
    ++round;
    state.SetIterationTime(total);
  }
  std::vector<double> med;
  for (auto& v : t) med.push_back(median(v));
  return med;
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
  // The contestants, in a different order every round (all rotations, both directions: none always
  // runs first on warm data): our dense projection, each bare GEMM of the whole y = x W this binary
  // has (Eigen's; oneDNN's when built with it), and BD. Contestant 0 is ours, the last is BD.
  struct contestant {
    const char* name;
    std::function<void()> run;
  };
  std::vector<contestant> c;
  c.push_back({"dense", [&] { bd::project(cpu{}, p.dense, x.view(), y.view(), ws.data(), ws.size(), po); }});
  c.push_back({"gemm", [&] { ym.noalias() = xm * wm; }});
#if defined(BASISATTN_WITH_ONEDNN) && BASISATTN_WITH_ONEDNN
  c.push_back({"onednn", [&] {
                 dnnl_sgemm('N', 'N', tokens, p.dense.out_dim(), p.dense.in_dim(), 1.f, x.data(), p.dense.in_dim(),
                            p.dense.weight.data(), p.dense.out_dim(), 0.f, y.data(), p.dense.out_dim());
               }});
#endif
  c.push_back({"bd", [&] { bd::project(cpu{}, p.bd, x.view(), y.view(), ws.data(), ws.size(), po); }});
  const int n = static_cast<int>(c.size());
  std::vector<std::function<void()>> runs;
  for (auto& e : c) runs.push_back(e.run);
  const std::vector<double> med = time_alternating(state, runs);
  const double dense_flop = 2.0 * double(tokens) * ds::kv_lora_rank * ds::heads * ds::qk_nope;
  const double bd_flop = 2.0 * double(tokens) * (ds::kv_lora_rank - ds::qk_nope) * ds::heads * ds::qk_nope;
  state.counters["peak_GFLOPs"] = peak;
  double fastest_dense = 1e300;
  for (int i = 0; i < n; ++i) {
    const std::string name = c[static_cast<std::size_t>(i)].name;
    const double m = med[static_cast<std::size_t>(i)];
    const double flop = i == n - 1 ? bd_flop : dense_flop;
    if (i < n - 1) fastest_dense = std::min(fastest_dense, m);
    state.counters[name + "_ms"] = m * 1e3;
    state.counters[name + "_GFLOPs"] = flop / m * 1e-9;
    state.counters[name + "_peak"] = flop / m * 1e-9 / peak;
  }
  const double mb = med.back();
  state.counters["ratio"] = med.front() / mb;            // against our dense projection
  state.counters["ratio_fastest"] = fastest_dense / mb;  // against the fastest dense GEMM here
  set_threads(1);
}

void BM_kv_up_projection_bf16(benchmark::State& state) {
  static const kv_up p(true);
  static const bd::bd_projection<Eigen::bfloat16> pb = [] {
    bd::bd_projection<Eigen::bfloat16> b;
    b.in_dim = p.bd.in_dim, b.rank = p.bd.rank, b.heads = p.bd.heads, b.basis = p.bd.basis, b.rest = p.bd.rest;
    b.coeff = matrix<Eigen::bfloat16>(p.bd.coeff.rows(), p.bd.coeff.cols());
    for (index_t i = 0; i < b.coeff.size(); ++i) b.coeff.data()[i] = Eigen::bfloat16(p.bd.coeff.data()[i]);
    return b;
  }();
  const index_t tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  const double peak = peak_gflops(threads);
  matrix<float> x(tokens, ds::kv_lora_rank), y(tokens, p.bd.out_dim());
  matrix<Eigen::bfloat16> xb(tokens, ds::kv_lora_rank), yb(tokens, p.bd.out_dim());
  std::mt19937 g(7);
  std::normal_distribution<float> nd;
  for (index_t i = 0; i < x.size(); ++i) xb.data()[i] = Eigen::bfloat16(x.data()[i] = nd(g));
  std::vector<unsigned char> ws(
      std::max(bd::workspace_bytes(cpu{}, p.bd, tokens), bd::workspace_bytes(cpu{}, pb, tokens)) + 64);
  bd::project_options po;
  po.check_finite = false;
  const auto med =
      time_alternating(state, {[&] { bd::project(cpu{}, p.bd, x.view(), y.view(), ws.data(), ws.size(), po); },
                               [&] { bd::project(cpu{}, pb, xb.view(), yb.view(), ws.data(), ws.size(), po); }});
  const double bd_flop = 2.0 * double(tokens) * (ds::kv_lora_rank - ds::qk_nope) * ds::heads * ds::qk_nope;
  state.counters["peak_GFLOPs"] = peak;
  state.counters["bd_fp32_ms"] = med[0] * 1e3;
  state.counters["bd_ms"] = med[1] * 1e3;
  state.counters["bd_fp32_peak"] = bd_flop / med[0] * 1e-9 / peak;
  state.counters["bd_peak"] = bd_flop / med[1] * 1e-9 / peak;
  state.counters["ratio_fp32"] = med[0] / med[1];
  state.counters["bf16_dot"] = ::basisattn::detail::bf16_dot_available ? 1 : 0;
  set_threads(1);
}

void BM_gqa_kv_projection(benchmark::State& state) {
  struct shape {
    index_t dm, kv_heads, d;
  };
  static const shape shapes[] = {{576, 3, 64}, {4096, 8, 128}, {384, 12, 32}};
  const shape sh = shapes[state.range(0)];
  const index_t tokens = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  // Prepared once per shape (the factorization of 4096 x 1024 takes a while).
  struct prepared {
    bd::dense_projection<float> dense;
    bd::bd_projection<float> shared, per_head;
  };
  static std::map<index_t, prepared> cache;
  set_threads(2);
  if (!cache.count(state.range(0))) {
    std::mt19937 g(11);
    std::normal_distribution<float> nd;
    matrix<float> w(sh.dm, sh.kv_heads * sh.d);
    for (index_t i = 0; i < w.size(); ++i) w.data()[i] = nd(g);
    std::vector<matrix_view<const float>> heads;
    std::vector<bd::shared_basis> each;
    for (index_t h = 0; h < sh.kv_heads; ++h) {
      heads.push_back(w.view().block(0, h * sh.d, sh.dm, sh.d));
      each.push_back(bd::factorize<float>(std::vector<matrix_view<const float>>{heads.back()}));
    }
    prepared p;
    p.dense = bd::make_dense_projection<float>(w.view());
    p.shared = bd::make_bd_projection<float>(bd::factorize<float>(heads));
    p.per_head = bd::make_bd_projection<float>(each);
    cache.emplace(state.range(0), std::move(p));
  }
  const prepared& p = cache.at(state.range(0));
  set_threads(threads);
  const double peak = peak_gflops(threads);
  const index_t out = sh.kv_heads * sh.d;
  matrix<float> x(tokens, sh.dm), y(tokens, out);
  std::mt19937 g(7);
  std::normal_distribution<float> nd;
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
  std::vector<unsigned char> ws(
      std::max({bd::workspace_bytes(cpu{}, p.dense, tokens), bd::workspace_bytes(cpu{}, p.shared, tokens),
                bd::workspace_bytes(cpu{}, p.per_head, tokens)}) +
      64);
  bd::project_options po;
  po.check_finite = false;
  using rm = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const rm> xm(x.data(), tokens, sh.dm), wm(p.dense.weight.data(), sh.dm, out);
  Eigen::Map<rm> ym(y.data(), tokens, out);
  std::vector<std::pair<std::string, std::function<void()>>> c;
  c.push_back({"dense", [&] { bd::project(cpu{}, p.dense, x.view(), y.view(), ws.data(), ws.size(), po); }});
  c.push_back({"gemm", [&] { ym.noalias() = xm * wm; }});
#if defined(BASISATTN_WITH_ONEDNN) && BASISATTN_WITH_ONEDNN
  c.push_back({"onednn", [&] {
                 dnnl_sgemm('N', 'N', tokens, out, sh.dm, 1.f, x.data(), sh.dm, p.dense.weight.data(), out, 0.f,
                            y.data(), out);
               }});
#endif
  const std::size_t n_dense = c.size();
  c.push_back({"bd_shared", [&] { bd::project(cpu{}, p.shared, x.view(), y.view(), ws.data(), ws.size(), po); }});
  c.push_back({"bd_per_head", [&] { bd::project(cpu{}, p.per_head, x.view(), y.view(), ws.data(), ws.size(), po); }});
  std::vector<std::function<void()>> runs;
  for (auto& e : c) runs.push_back(e.second);
  const std::vector<double> med = time_alternating(state, runs);
  const double dense_flop = 2.0 * double(tokens) * double(sh.dm) * double(out);
  const double bd_flop = 2.0 * double(tokens) * double(sh.dm - sh.d) * double(out);
  state.counters["peak_GFLOPs"] = peak;
  double fastest_dense = 1e300;
  for (std::size_t i = 0; i < c.size(); ++i) {
    const double flop = i < n_dense ? dense_flop : bd_flop;
    if (i < n_dense) fastest_dense = std::min(fastest_dense, med[i]);
    state.counters[c[i].first + "_ms"] = med[i] * 1e3;
    state.counters[c[i].first + "_peak"] = flop / med[i] * 1e-9 / peak;
  }
  state.counters["ratio_shared"] = fastest_dense / med[n_dense];
  state.counters["ratio_per_head"] = fastest_dense / med[n_dense + 1];
  state.counters["per_head_cost"] = med[n_dense + 1] / med[n_dense];
  set_threads(1);
}

void BM_kv_up_projection(benchmark::State& s) { run_projection(s, true); }
void BM_kv_up_projection_gather(benchmark::State& s) { run_projection(s, false); }

/// All 27 layers, each step `one_layer(l)`, layers spread over `threads` threads (the library's own
/// parallel loops run single-threaded inside this region).
template <class F>
void time_model(benchmark::State& state, int threads, F&& one_layer) {
  // A team of one thread is not a parallel region to OpenMP: without this, the library's loops and
  // Eigen's products inside it would use every core.
  set_threads(threads);
  for (auto _ : state) {
    const auto t = std::chrono::steady_clock::now();
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) num_threads(threads)
#endif
    for (index_t l = 0; l < ds::layers; ++l) one_layer(l);
    state.SetIterationTime(seconds_since(t));
  }
  set_threads(1);
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
  bd::mla_options opt;
  opt.prepare.round = state.range(1) ? bd::rounding::error_aware : bd::rounding::nearest;
  time_model(state, static_cast<int>(state.range(0)), [&](index_t) {
    const auto layer = bd::prepare_mla<T>(views, ds::config(), opt);
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
BENCHMARK(BM_gqa_kv_projection)
    ->ArgNames({"shape", "tokens", "threads"})
    ->ArgsProduct({{0, 1, 2}, {16, 4096}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_kv_up_projection_bf16)
    ->ArgNames({"tokens", "threads"})
    ->ArgsProduct({{4096, 32768}, {1, 2}})
    ->MinTime(2.0)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_prepare_model, Eigen::half)
    ->ArgNames({"threads", "error_aware"})
    ->ArgsProduct({{1, 2}, {1, 0}})
    ->UseManualTime()
    ->Unit(benchmark::kSecond)
    ->Iterations(2);
BENCHMARK_TEMPLATE(BM_prepare_model, float)
    ->ArgNames({"threads", "error_aware"})
    ->Args({2, 1})
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

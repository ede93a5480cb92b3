// basisattn demo: Basis Decomposition of a DeepSeek-V2-Lite-shaped MLA attention layer.
//
// Builds one MLA layer with DeepSeek-V2-Lite's shapes (hidden 2048, 16 heads, latent 512, head dim
// 128, rope 64; random weights of those shapes, fixed seed), prepares it dense and with BD (K-nope
// and V up-projections rewritten over a shared basis of 128 of the 512 latent channels), and prints
//   - what preparation chose (strategy, conditioning, max |C|) and how long it took,
//   - weight bytes dense vs BD,
//   - the output error of the dense and of the BD layer, fp32 and fp16, against the dense layer
//     computed in double on the same input, and BD against dense,
//   - the dense vs BD time of the K/V up-projection (the part BD makes cheaper), alternating in one
//     run, with GFLOP/s as a fraction of the fp32 peak measured in the same run (cpu_peak.hpp).
// Usage: mla_demo [tokens_for_timing=4096] [tokens_for_error=256]
#include <basisattn/basisattn.hpp>

#include "cpu_peak.hpp"
#include "deepseek_shapes.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace basisattn;
namespace ds = deepseek_v2_lite;

namespace {

using bench_util::seconds_since;

template <class A, class B>
double rel_diff(const matrix<A>& a, const matrix<B>& b) {
  double num = 0, den = 0;
  for (index_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(static_cast<float>(a.data()[i]));
    const double y = static_cast<double>(b.data()[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num / den);
}

struct layer_errors {
  double dense, bd, bd_vs_dense;
};

/// Dense and BD layers in storage T against the dense layer computed in double, same input.
template <class T>
layer_errors layer_error(const ds::weights& w, const matrix<double>& x, const matrix<double>& ref) {
  bd::mla_options dense_opt;
  dense_opt.bd = false;
  const auto dense = bd::prepare_mla<T>(w.views(), ds::config(), dense_opt);
  const auto bdl = bd::prepare_mla<T>(w.views(), ds::config());
  matrix<T> xt(x.rows(), x.cols()), yd(x.rows(), ds::hidden), yb(x.rows(), ds::hidden);
  for (index_t i = 0; i < x.size(); ++i) xt.data()[i] = T(static_cast<float>(x.data()[i]));
  bd::forward(cpu{}, dense, xt.view(), yd.view());
  bd::forward(cpu{}, bdl, xt.view(), yb.view());
  matrix<double> ydd(yd.rows(), yd.cols());
  for (index_t i = 0; i < yd.size(); ++i) ydd.data()[i] = static_cast<double>(static_cast<float>(yd.data()[i]));
  return {rel_diff(yd, ref), rel_diff(yb, ref), rel_diff(yb, ydd)};
}

}  // namespace

int main(int argc, char** argv) {
  const index_t t_time = argc > 1 ? std::atol(argv[1]) : 4096;
  const index_t t_err = argc > 2 ? std::atol(argv[2]) : 256;
  if (t_time < 1 || t_err < 1) {
    std::fprintf(stderr, "usage: %s [tokens_for_timing>=1] [tokens_for_error>=1]\n", argv[0]);
    return 2;
  }
  try {
    std::printf("basisattn %d.%d.%d - BD on a DeepSeek-V2-Lite-shaped MLA layer\n", BASISATTN_VERSION_MAJOR,
                BASISATTN_VERSION_MINOR, BASISATTN_VERSION_PATCH);
    std::printf(
        "shapes: hidden %ld, heads %ld, latent (kv_lora_rank) %ld, qk_nope %ld, qk_rope %ld, v_head %ld; random "
        "weights, seed 1\n",
        long(ds::hidden), long(ds::heads), long(ds::kv_lora_rank), long(ds::qk_nope), long(ds::qk_rope),
        long(ds::v_head));
    const ds::weights w(1);

    auto t0 = std::chrono::steady_clock::now();
    const auto layer = bd::prepare_mla<float>(w.views(), ds::config());
    const double prep_s = seconds_since(t0);
    const auto& k_up = std::get<bd::bd_projection<float>>(layer.k_up);
    const auto& rep = k_up.report;
    std::printf("\npreparation (fp32, strategy %s, one basis for the 16 K heads, one for the 16 V heads): %.3f s\n",
                bd::to_string(rep.used), prep_s);
    const auto& vrep = std::get<bd::bd_projection<float>>(layer.v_up).report;
    std::printf(
        "  K basis: %ld of %ld latent channels; min rcond(A_S) %.3g; max |C| %.3g; %ld basis swaps;\n"
        "           estimated error growth vs dense rounding %.2fx\n",
        long(k_up.rank), long(k_up.in_dim), rep.min_rcond, rep.max_abs_coeff, long(rep.swaps), rep.error_growth);
    std::printf("  V basis: min rcond(A_S) %.3g; max |C| %.3g; %ld basis swaps; estimated error growth %.2fx\n",
                vrep.min_rcond, vrep.max_abs_coeff, long(vrep.swaps), vrep.error_growth);
    std::printf("  weight bytes: dense %.2f MiB, BD %.2f MiB (K/V up-projection %.2f -> %.2f MiB, -25%%)\n",
                layer.dense_bytes() / 1048576.0, layer.bytes() / 1048576.0,
                2.0 * ds::kv_lora_rank * ds::heads * ds::qk_nope * 4 / 1048576.0,
                (bd::bytes_of(layer.k_up) + bd::bytes_of(layer.v_up)) / 1048576.0);

    std::mt19937 g(3);
    std::normal_distribution<float> nd;
    matrix<double> x_err(t_err, ds::hidden), ref(t_err, ds::hidden);
    for (index_t i = 0; i < x_err.size(); ++i) x_err.data()[i] = static_cast<float>(nd(g));  // exact in every type
    {
      bd::mla_options dense_opt;
      dense_opt.bd = false;
      const auto dense64 = bd::prepare_mla<double>(w.views(), ds::config(), dense_opt);
      bd::forward(cpu{}, dense64, x_err.view(), ref.view());
    }
    std::printf("\nlayer output error, %ld tokens, causal; relative to the dense layer computed in double:\n",
                long(t_err));
    std::printf("  %-5s %14s %14s %14s\n", "dtype", "dense layer", "BD layer", "BD vs dense");
    const layer_errors e32 = layer_error<float>(w, x_err, ref);
    std::printf("  %-5s %14.3g %14.3g %14.3g   (unit roundoff 6.0e-08)\n", "fp32", e32.dense, e32.bd, e32.bd_vs_dense);
    const layer_errors e16 = layer_error<Eigen::half>(w, x_err, ref);
    std::printf("  %-5s %14.3g %14.3g %14.3g   (unit roundoff 4.9e-04)\n", "fp16", e16.dense, e16.bd, e16.bd_vs_dense);

    // Timing: K up-projection, dense (x W, 512 -> 2048) vs BD (basis copy + x_rest C, 384 -> 2048).
    const auto dense = bd::make_dense_projection<float>(w.k_up_weight().view());
    matrix<float> x(t_time, ds::kv_lora_rank), y(t_time, ds::heads * ds::qk_nope);
    for (index_t i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
    std::vector<unsigned char> ws(
        std::max(bd::workspace_bytes(cpu{}, dense, t_time), bd::workspace_bytes(cpu{}, k_up, t_time)));
    bd::project_options po;
    po.check_finite = false;
    std::printf(
        "\nK up-projection (latent -> 16 x 128), fp32, %ld tokens, medians of 7 runs each, each dense\n"
        "contestant alternating with BD (dense first, then BD first, ...); speeds as a fraction of this\n"
        "machine's fp32 FMA peak measured here with the same number of threads:\n",
        long(t_time));
#if defined(_OPENMP)
    const int max_threads = omp_get_max_threads();
#else
    const int max_threads = 1;
#endif
    const double dense_flop = 2.0 * double(t_time) * ds::kv_lora_rank * ds::heads * ds::qk_nope;
    const double bd_flop = 2.0 * double(t_time) * (ds::kv_lora_rank - ds::qk_nope) * ds::heads * ds::qk_nope;
    for (int threads : {1, max_threads}) {
#if defined(_OPENMP)
      omp_set_num_threads(threads);
#endif
      Eigen::setNbThreads(threads);
      const double peak = bench_util::fp32_peak_gflops(threads);
      const auto [td, tb] = bench_util::alternating(
          7, [&] { bd::project(cpu{}, dense, x.view(), y.view(), ws.data(), ws.size(), po); },
          [&] { bd::project(cpu{}, k_up, x.view(), y.view(), ws.data(), ws.size(), po); });
      // The bare GEMM y = x W of the build's provider on all tokens at once (its own threading): the
      // fastest dense product in this binary, which BD must beat.
      const auto [tg, tb2] = bench_util::alternating(
          7,
          [&] {
            basisattn::detail::cpu_gemm<float>(false, false, t_time, dense.out_dim(), dense.in_dim(), 1.f, x.data(),
                                               dense.in_dim(), dense.weight.data(), dense.out_dim(), 0.f, y.data(),
                                               dense.out_dim());
          },
          [&] { bd::project(cpu{}, k_up, x.view(), y.view(), ws.data(), ws.size(), po); });
      const double md = bench_util::median(td), mg = bench_util::median(tg);
      std::vector<double> bd_all = tb;  // BD's samples of both pairs pooled: one median for BD
      bd_all.insert(bd_all.end(), tb2.begin(), tb2.end());
      const double mb = bench_util::median(bd_all);
      std::printf(
          "  %d thread%s (peak %.0f GFLOP/s): dense projection %.2f ms (%.0f%% of peak), bare %s GEMM %.2f ms "
          "(%.0f%%), BD %.2f ms (%.0f%%);\n      fastest dense / BD time ratio %.3f (FLOP limit 512/384 = 1.333)\n",
          threads, threads > 1 ? "s" : " ", peak, md * 1e3, 100 * dense_flop / md * 1e-9 / peak,
          backend_traits<cpu>::gemm, mg * 1e3, 100 * dense_flop / mg * 1e-9 / peak, mb * 1e3,
          100 * bd_flop / mb * 1e-9 / peak, std::min(md, mg) / mb);
      if (max_threads == 1) break;
    }
    return 0;
  } catch (const basisattn::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

// basisattn demo: Basis Decomposition of a DeepSeek-V2-Lite-shaped MLA attention layer.
//
// Builds one MLA layer with DeepSeek-V2-Lite's shapes (hidden 2048, 16 heads, latent 512, head dim
// 128, rope 64; random weights of those shapes, fixed seed), prepares it dense and with BD (K-nope
// and V up-projections rewritten over a shared basis of 128 of the 512 latent channels), and prints
//   - what preparation chose (strategy, conditioning, max |C|) and how long it took,
//   - weight bytes dense vs BD,
//   - the BD layer's output error against the dense layer on the same input, fp32 and fp16,
//   - the dense vs BD time of the K/V up-projection (the part BD makes cheaper), same run.
// Usage: mla_demo [tokens_for_timing=4096] [tokens_for_error=256]
#include <basisattn/basisattn.hpp>

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

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

template <class T>
double rel_diff(const matrix<T>& a, const matrix<T>& b) {
  double num = 0, den = 0;
  for (index_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(static_cast<float>(a.data()[i])), y = static_cast<double>(static_cast<float>(b.data()[i]));
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num / den);
}

template <class T>
double layer_error(const ds::weights& w, index_t tokens, std::mt19937& g) {
  bd::mla_options dense_opt;
  dense_opt.bd = false;
  const auto dense = bd::prepare_mla<T>(w.views(), ds::config(), dense_opt);
  const auto bdl = bd::prepare_mla<T>(w.views(), ds::config());
  matrix<T> x(tokens, ds::hidden), yd(tokens, ds::hidden), yb(tokens, ds::hidden);
  std::normal_distribution<float> nd;
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] = T(nd(g));
  bd::forward(cpu{}, dense, x.view(), yd.view());
  bd::forward(cpu{}, bdl, x.view(), yb.view());
  return rel_diff(yb, yd);
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
    std::printf("shapes: hidden %ld, heads %ld, latent (kv_lora_rank) %ld, qk_nope %ld, qk_rope %ld, v_head %ld; random weights, seed 1\n",
                long(ds::hidden), long(ds::heads), long(ds::kv_lora_rank), long(ds::qk_nope), long(ds::qk_rope), long(ds::v_head));
    const ds::weights w(1);

    auto t0 = std::chrono::steady_clock::now();
    const auto layer = bd::prepare_mla<float>(w.views(), ds::config());
    const double prep_s = seconds_since(t0);
    const auto& k_up = std::get<bd::bd_projection<float>>(layer.k_up);
    const auto& rep = k_up.report;
    std::printf("\npreparation (fp32, strategy %s, one basis shared by the 16 K and 16 V heads): %.3f s\n",
                bd::to_string(rep.used), prep_s);
    std::printf("  basis: %ld of %ld latent channels; min rcond(A_S) %.3g; max |C| %.3g; %ld max-volume swaps\n",
                long(k_up.rank), long(k_up.in_dim), rep.min_rcond, rep.max_abs_coeff, long(rep.swaps));
    std::printf("  weight bytes: dense %.2f MiB, BD %.2f MiB (K/V up-projection %.2f -> %.2f MiB, -25%%)\n",
                layer.dense_bytes() / 1048576.0, layer.bytes() / 1048576.0,
                2.0 * ds::kv_lora_rank * ds::heads * ds::qk_nope * 4 / 1048576.0,
                (bd::bytes_of(layer.k_up) + bd::bytes_of(layer.v_up)) / 1048576.0);

    std::mt19937 g(3);
    const double e32 = layer_error<float>(w, t_err, g);
    const double e16 = layer_error<Eigen::half>(w, t_err, g);
    std::printf("\nBD layer vs dense layer, same input (%ld tokens, causal), ||y_bd - y_dense|| / ||y_dense||:\n",
                long(t_err));
    std::printf("  fp32 weights: %.3g    (fp32 unit roundoff 6.0e-08)\n", e32);
    std::printf("  fp16 weights: %.3g    (fp16 unit roundoff 4.9e-04)\n", e16);

    // Timing: K up-projection, dense (x W, 512 -> 2048) vs BD (basis copy + x_rest C, 384 -> 2048).
    bd::dense_projection<float> dense;
    {
      matrix<float> wk(ds::kv_lora_rank, ds::heads * ds::qk_nope);
      const auto v = w.views();
      for (index_t i = 0; i < ds::kv_lora_rank; ++i)
        for (index_t h = 0; h < ds::heads; ++h)
          for (index_t j = 0; j < ds::qk_nope; ++j) wk(i, h * ds::qk_nope + j) = v.wkv_b(i, h * (ds::qk_nope + ds::v_head) + j);
      dense = bd::make_dense_projection<float>(wk.view());
    }
    matrix<float> x(t_time, ds::kv_lora_rank), y(t_time, ds::heads * ds::qk_nope);
    std::normal_distribution<float> nd;
    for (index_t i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
    std::vector<unsigned char> ws(std::max(bd::project_workspace_bytes(cpu{}, dense, t_time),
                                           bd::project_workspace_bytes(cpu{}, k_up, t_time)));
    bd::project_options po;
    po.check_finite = false;
    std::printf("\nK up-projection (latent -> 16 x 128), fp32, %ld tokens, median of 7 alternating runs:\n", long(t_time));
#if defined(_OPENMP)
    const int max_threads = omp_get_max_threads();
#else
    const int max_threads = 1;
#endif
    for (int threads : {1, max_threads}) {
#if defined(_OPENMP)
      omp_set_num_threads(threads);
#endif
      Eigen::setNbThreads(threads);
      std::vector<double> td, tb;
      for (int rep_i = 0; rep_i < 8; ++rep_i) {
        auto t = std::chrono::steady_clock::now();
        bd::project(cpu{}, dense, x.view(), y.view(), ws.data(), ws.size(), po);
        const double d = seconds_since(t);
        t = std::chrono::steady_clock::now();
        bd::project(cpu{}, k_up, x.view(), y.view(), ws.data(), ws.size(), po);
        const double b = seconds_since(t);
        if (rep_i > 0) td.push_back(d), tb.push_back(b);  // first run warms up
      }
      std::sort(td.begin(), td.end());
      std::sort(tb.begin(), tb.end());
      const double md = td[td.size() / 2], mb = tb[tb.size() / 2];
      std::printf("  %d thread%s: dense %.2f ms, BD %.2f ms, dense/BD time ratio %.3f (FLOP limit 512/384 = 1.333)\n", threads,
                  threads > 1 ? "s" : " ", md * 1e3, mb * 1e3, md / mb);
      if (max_threads == 1) break;
    }
    return 0;
  } catch (const basisattn::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

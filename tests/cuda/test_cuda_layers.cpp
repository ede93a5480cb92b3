// CUDA attention layers: bd::forward(ctx, upload(layer), ...) and bd::forward(cpu{}, layer, ...) on the
// same prepared layer, each against that layer's double-precision reference, for MHA, GQA and MQA
// (no RoPE, RoPE interleaved and half, with and without biases, causal or not) and MLA (small DeepSeek-V2-like
// shapes and DeepSeek-V2-Lite's head dims with 2 heads; dense, BD per-side and joint bases), dense
// and BD, in fp32, fp16 and bf16. Every case uses fresh random weights and inputs (the seed is
// printed at the start and on failure; BASISATTN_TEST_SEED reruns one), padded row strides for x and
// y, and poisons y and the whole workspace (all bytes 0xFF: NaN in every dtype) before each run, so an
// unwritten output or an intermediate read before it is written shows up as a non-finite element.
// Each case runs twice: with the default projection epilogue (cuBLASLt where available) and with
// cuda_epilogue::prefill. [sanitize]: one GQA and one MLA layer, small (compute-sanitizer).
// [large]: a 4096-token GQA layer against a double-precision reference, and the layer kernels
// (RoPE, RMSNorm, head concatenation) at sizes past their grid-stride caps.
//
// Bound: the GPU output and the CPU output are each checked against the double-precision reference of
// the same stored layer (common/stored_layer_reference.hpp: the layer's own dense or BD weights, its
// RoPE style and offset, causal or not, in double), ||y - ref||_F / ||ref||_F <= tol, with tol derived
// per run from the data by the layer error model of tests/test_bd_layers.cpp (layer_error_model; its
// terms for this use are written out in stored_layer_reference.hpp): every value stored in T carries
// u_T, every k-term fp32 sum sqrt(k) u_32 (root mean square), the stages add linearly, and the score
// errors of q and k reach the output through the softmax gains g_q, g_k of this layer's own reference
// q, k, v. The GPU's model adds the CUDA attention kernel's fixed roundings (8 instead of 4: expf is
// accurate to 2 ulp) and, for a BD projection, the prefill epilogue's second rounding to T. Against the
// stored layer the BD weight rounding (e_w in test_bd_layers) is not part of the error. Measured with
// the CPU backend on these cases (20 seeds, 20-120 runs per family; a scratch program outside the
// repo), worst error / CPU bound: MHA/GQA/MQA dense and BD 0.15 (fp32), 0.29 (fp16), 0.31 (bf16); MLA
// (all three shapes, dense, BD per-side and joint) 0.10 (fp32), 0.18 (fp16), 0.18 (bf16): a margin of
// 3 or more (the model is conservative: in fp32 the bound is 7-13 times the measured error, in 16-bit
// 3-8 times), and the GPU's bound is the larger. The GPU - CPU difference is printed, not checked (by
// the triangle inequality it is within the sum of the two bounds). (The 4096-token case uses the same
// model: see gqa_long.)
// Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "cuda_harness.hpp"

#include "reference_layers.hpp"
#include "stored_layer_reference.hpp"
#include "test_util.hpp"

#include <basisattn/bd/layers.hpp>
#include <basisattn/cpu/layers.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/kernel_launch.hpp>
#include <basisattn/cuda/layers.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::code_of;
using cudatest::device_tensor;
using cudatest::from_d;
using cudatest::host_tensor;
using cudatest::nerr_finite;
using cudatest::padding;
using cudatest::poison;
using cudatest::random_matrix;
using cudatest::random_vector;
using cudatest::readback;
using cudatest::to_d;

/// Run host layer HL on the CPU and, uploaded, on the GPU (default epilogue, then prefill); check each
/// against the double reference of the stored layer with its backend's model bound (see the header).
template <class T, class HL>
void check_layer(const cuda_context& ctx, const HL& layer, index_t d_model, index_t n, const bd::forward_options& fo,
                 std::mt19937_64& g) {
  const index_t ldx = d_model + 3, ldy = d_model + 5;
  const matrix<T> x = random_matrix<T>(g, n, d_model, 1.0);
  layerref::gain_sums gs;
  const Eigen::MatrixXd ref = layerref::reference(layer, test::to_double(x), fo.position_offset, gs);
  const double uT = test::u<T>();
  const double tol_cpu = layerref::model_of(layer, n, layerref::backend::cpu).template tol<T>(gs);
  const double tol_gpu = layerref::model_of(layer, n, layerref::backend::cuda).template tol<T>(gs);
  matrix<T> want(n, d_model);
  bd::forward(cpu{}, layer, x.view(), want.view(), fo);
  const double err_cpu = test::rel_error(test::to_double(want), ref);
  INFO("dtype " << to_string(dtype_of_v<T>) << ": g_q " << gs.g_q() << ", g_k " << gs.g_k() << "; CPU error "
                << err_cpu / uT << " u_T, bound " << tol_cpu / uT << " u_T");
  CHECK(err_cpu <= tol_cpu);

  // x with token rows of d_model + 3 elements (the padding holds 7), y of d_model + 5
  const auto dl = bd::upload(ctx, layer);
  const device_tensor<T> dx(ctx, x.data(), n, 1, d_model, padding{0, ldx - d_model}, 7.0);
  device_tensor<T> dy(n, 1, d_model, padding{0, ldy - d_model});
  host_tensor<T> y(n, 1, d_model);
  for (bd::cuda_epilogue epi : {bd::cuda_epilogue::automatic, bd::cuda_epilogue::prefill}) {
    bd::cuda_project_options po;
    po.epilogue = epi;
    device_buffer<unsigned char> ws(static_cast<index_t>(bd::workspace_bytes(ctx, dl, n, po)));
    for (int run = 0; run < 2; ++run) {  // the second run goes through the projections' cached plans
      dy.poison(ctx);
      poison(ctx, ws);
      bd::forward(ctx, dl, dx.cmview(), dy.mview(), ws.data(), ws.bytes(), fo, po);
      ctx.synchronize();
      const readback c = dy.download(ctx, y);
      const double nerr = nerr_finite(y, ref), vs_cpu = nerr_finite(y, want);
      INFO("epilogue " << (epi == bd::cuda_epilogue::prefill ? "prefill" : "automatic") << ", run " << run
                       << ": GPU error " << nerr / uT << " u_T, bound " << tol_gpu / uT
                       << " u_T (GPU - CPU: " << vs_cpu / uT << " u_T)");
      CHECK(c.non_finite == 0);
      CHECK(c.padding_touched == 0);
      CHECK(nerr <= tol_gpu);
    }
  }
}

enum class rope_kind { none, interleaved, half };

template <class T>
void mha_suite() {
  const std::uint64_t seed = cudatest::test_seed((std::string("layers MHA ") + to_string(dtype_of_v<T>)).c_str());
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const index_t dm = 64, d = 16, n = 37, H = 4;
  const double s = 0.25;
  for (index_t Hkv : {index_t(4), index_t(2), index_t(1)})
    for (rope_kind rk : {rope_kind::none, rope_kind::interleaved, rope_kind::half})
      for (bool bias : {false, true}) {
        const auto wq = random_matrix<T>(g, dm, H * d, s), wk = random_matrix<T>(g, dm, Hkv * d, s),
                   wv = random_matrix<T>(g, dm, Hkv * d, s), wo = random_matrix<T>(g, H * d, dm, s);
        const auto bq = random_vector<T>(g, H * d, 0.1), bk = random_vector<T>(g, Hkv * d, 0.1),
                   bv = random_vector<T>(g, Hkv * d, 0.1), bo = random_vector<T>(g, dm, 0.1);
        bd::mha_weights<T> w{wq.view(), wk.view(), wv.view(), wo.view()};
        if (bias) w.bq = bq.data(), w.bk = bk.data(), w.bv = bv.data(), w.bo = bo.data();
        bd::mha_config cfg{dm, H, Hkv, d};
        cfg.causal = Hkv != 2;           // GQA runs bidirectional
        cfg.scale = Hkv == 1 ? 0.3 : 0;  // MQA with an explicit scale
        cfg.use_rope = rk != rope_kind::none;
        cfg.rope.style = rk == rope_kind::half ? rope_style::half : rope_style::interleaved;
        cfg.rope.position_offset = 2;
        bd::forward_options fo;
        fo.position_offset = cfg.use_rope ? 11 : 0;
        for (bool use_bd : {false, true}) {
          bd::mha_options mo;
          mo.bd_qk = use_bd && !cfg.use_rope;
          mo.bd_vo = use_bd;
          const auto L = bd::prepare_mha<T>(w, cfg, mo);
          INFO("MHA: heads " << H << "/" << Hkv << ", rope " << static_cast<int>(rk) << ", bias " << bias << ", "
                             << (use_bd ? "BD" : "dense") << ", causal " << cfg.causal);
          check_layer<T>(ctx, L, dm, n, fo, g);
        }
      }
}

struct mla_shape {
  index_t dm, H, Lr, dn, dr, dv, n;
};

template <class T>
void mla_suite() {
  const std::uint64_t seed = cudatest::test_seed((std::string("layers MLA ") + to_string(dtype_of_v<T>)).c_str());
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  // Small DeepSeek-V2-like, without a rope part, and DeepSeek-V2-Lite head dims (192 / 128) with 2 heads.
  const mla_shape shapes[] = {{96, 4, 48, 16, 8, 16, 29}, {64, 3, 40, 16, 0, 8, 21}, {256, 2, 256, 128, 64, 128, 40}};
  for (const mla_shape& sh : shapes) {
    const double s = 0.2 * std::sqrt(96.0 / double(sh.dm));
    const auto wq = random_matrix<T>(g, sh.dm, sh.H * (sh.dn + sh.dr), s),
               wa = random_matrix<T>(g, sh.dm, sh.Lr + sh.dr, s),
               wb = random_matrix<T>(g, sh.Lr, sh.H * (sh.dn + sh.dv), 0.2 * std::sqrt(48.0 / double(sh.Lr))),
               wo = random_matrix<T>(g, sh.H * sh.dv, sh.dm, s);
    const auto norm = random_vector<T>(g, sh.Lr, 0.2, 1.0);
    bd::mla_weights<T> w{wq.view(), wa.view(), norm.data(), wb.view(), wo.view()};
    bd::mla_config cfg{sh.dm, sh.H, sh.Lr, sh.dn, sh.dr, sh.dv};
    for (rope_kind rk : {rope_kind::interleaved, rope_kind::half}) {
      if (sh.dr == 0 && rk == rope_kind::half) continue;
      cfg.rope.style = rk == rope_kind::half ? rope_style::half : rope_style::interleaved;
      cfg.causal = rk == rope_kind::interleaved;
      bd::forward_options fo;
      fo.position_offset = rk == rope_kind::half ? 7 : 0;
      for (int variant = 0; variant < 3; ++variant) {  // dense, BD per-side, BD joint
        if (variant == 2 && sh.dn != sh.dv) continue;
        bd::mla_options mo;
        mo.bd = variant > 0;
        mo.sharing = variant == 2 ? bd::basis_sharing::joint : bd::basis_sharing::per_side;
        const auto L = bd::prepare_mla<T>(w, cfg, mo);
        INFO("MLA: d_model " << sh.dm << ", heads " << sh.H << ", L " << sh.Lr << ", nope/rope/v " << sh.dn << "/"
                             << sh.dr << "/" << sh.dv << ", rope style " << static_cast<int>(rk) << ", variant "
                             << (variant == 0   ? "dense"
                                 : variant == 1 ? "BD per-side"
                                                : "BD joint"));
        check_layer<T>(ctx, L, sh.dm, sh.n, fo, g);
      }
    }
  }
}

/// One GQA layer (RoPE half style, biases; dense and BD on V/O) and one MLA layer (with a rope part,
/// so RMSNorm, RoPE and the head concatenation all run), small: for compute-sanitizer.
void sanitize_suite() {
  const std::uint64_t seed = cudatest::test_seed("layers [sanitize]");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  using T = Eigen::half;
  {
    const index_t dm = 64, d = 16, n = 37, H = 4, Hkv = 2;
    const double s = 0.25;
    const auto wq = random_matrix<T>(g, dm, H * d, s), wk = random_matrix<T>(g, dm, Hkv * d, s),
               wv = random_matrix<T>(g, dm, Hkv * d, s), wo = random_matrix<T>(g, H * d, dm, s);
    const auto bq = random_vector<T>(g, H * d, 0.1), bk = random_vector<T>(g, Hkv * d, 0.1),
               bv = random_vector<T>(g, Hkv * d, 0.1), bo = random_vector<T>(g, dm, 0.1);
    bd::mha_weights<T> w{wq.view(), wk.view(), wv.view(), wo.view(), bq.data(), bk.data(), bv.data(), bo.data()};
    bd::mha_config cfg{dm, H, Hkv, d};
    cfg.use_rope = true;
    cfg.rope.style = rope_style::half;
    bd::forward_options fo;
    fo.position_offset = 5;
    for (bool use_bd : {false, true}) {
      bd::mha_options mo;
      mo.bd_qk = false;
      mo.bd_vo = use_bd;
      INFO("GQA 4/2, RoPE half, biases, " << (use_bd ? "BD V/O" : "dense"));
      check_layer<T>(ctx, bd::prepare_mha<T>(w, cfg, mo), dm, n, fo, g);
    }
  }
  {
    const mla_shape sh{96, 4, 48, 16, 8, 16, 29};
    const double s = 0.2;
    const auto wq = random_matrix<T>(g, sh.dm, sh.H * (sh.dn + sh.dr), s),
               wa = random_matrix<T>(g, sh.dm, sh.Lr + sh.dr, s),
               wb = random_matrix<T>(g, sh.Lr, sh.H * (sh.dn + sh.dv), s),
               wo = random_matrix<T>(g, sh.H * sh.dv, sh.dm, s);
    const auto norm = random_vector<T>(g, sh.Lr, 0.2, 1.0);
    bd::mla_weights<T> w{wq.view(), wa.view(), norm.data(), wb.view(), wo.view()};
    bd::mla_config cfg{sh.dm, sh.H, sh.Lr, sh.dn, sh.dr, sh.dv};
    bd::mla_options mo;
    mo.bd = false;
    INFO("MLA, dense");
    check_layer<T>(ctx, bd::prepare_mla<T>(w, cfg, mo), sh.dm, sh.n, bd::forward_options{}, g);
  }
}

/// [large] A GQA layer on 4096 tokens (d_model 128, 4 query heads on 2 kv heads, d 32, RoPE half style,
/// biases, causal, dense projections) against the plain double reference of common/reference_layers.hpp,
/// once per projection epilogue.
/// Bound: the layer error model of tests/test_bd_layers.cpp (layer_error_model, the MHA terms), with the
/// gains of this layer's own reference (layerref::head_with_gains) and the GPU attention kernel's fixed
/// roundings (8: expf is accurate to 2 ulp, as in cudatest::exact_attention_tolerance); it is
/// layerref::model_of(L, n, cuda) (common/stored_layer_reference.hpp) for this dense layer:
///   tol = 3 u_T + u_32 (sqrt(dm + 1) + sqrt(n) + sqrt(H d + 1) + 8)
///       + g_q (2 u_T + u_32 (sqrt(dm + 1) + 1)) + g_k (2 u_T + u_32 (sqrt(dm + 1) + 1 + sqrt(d))):
/// v, the attention output and y stored (3 u_T); the projections' d_model-term sums plus bias, the P V
/// sums over up to n keys and the output projection's H d terms plus bias as root-mean-square growth;
/// q and k each stored twice (projection, RoPE) and a d_model-term sum plus bias and the rotation.
/// It is a root-mean-square, first-order model (a Frobenius norm over n d_model outputs concentrates
/// on its rms), like the CPU test's; the measured ratio is printed.
/// Host cost (16 cores): the CPU reference is dominated by P (KV) per head, 2 n^2 d d_v = 34 GFLOP in
/// double GEMMs (137 GFLOP for 4 heads, ~1 s with Eigen's threaded GEMM at ~10 GFLOP/s per core), plus
/// n^2 exps per head; 4 n x n double matrices (0.5 GB) at a time. The CPU layer forward is not run.
template <class T>
void gqa_long() {
  const std::uint64_t seed = cudatest::test_seed("layers [large] GQA 4096 tokens");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const index_t dm = 128, H = 4, Hkv = 2, d = 32, n = 4096;
  const double s = 0.25 * std::sqrt(64.0 / double(dm));  // the suites' q, k sizes (scores up to ~20)
  const auto wq = random_matrix<T>(g, dm, H * d, s), wk = random_matrix<T>(g, dm, Hkv * d, s),
             wv = random_matrix<T>(g, dm, Hkv * d, s), wo = random_matrix<T>(g, H * d, dm, s);
  const auto bq = random_vector<T>(g, H * d, 0.1), bk = random_vector<T>(g, Hkv * d, 0.1),
             bv = random_vector<T>(g, Hkv * d, 0.1), bo = random_vector<T>(g, dm, 0.1);
  bd::mha_weights<T> w{wq.view(), wk.view(), wv.view(), wo.view(), bq.data(), bk.data(), bv.data(), bo.data()};
  bd::mha_config cfg{dm, H, Hkv, d};
  cfg.causal = true;
  cfg.use_rope = true;
  cfg.rope.style = rope_style::half;
  cfg.rope.position_offset = 2;
  bd::forward_options fo;
  fo.position_offset = 11;
  bd::mha_options mo;
  mo.bd_qk = mo.bd_vo = false;
  const auto L = bd::prepare_mha<T>(w, cfg, mo);
  const matrix<T> x = random_matrix<T>(g, n, dm, 1.0);

  // The double reference (ref::mha's steps, with the attention and the gains per head).
  const auto t0 = std::chrono::steady_clock::now();
  auto row_of = [](const std::vector<T>& b) {
    Eigen::RowVectorXd r(static_cast<Eigen::Index>(b.size()));
    for (std::size_t i = 0; i < b.size(); ++i) r(static_cast<Eigen::Index>(i)) = to_d(b[i]);
    return r;
  };
  const Eigen::MatrixXd xd = test::to_double(x);
  Eigen::MatrixXd q = (xd * test::to_double(wq)).rowwise() + row_of(bq);
  Eigen::MatrixXd k = (xd * test::to_double(wk)).rowwise() + row_of(bk);
  const Eigen::MatrixXd v = (xd * test::to_double(wv)).rowwise() + row_of(bv);
  ref::rope(q, H, d, cfg.rope.theta, false, cfg.rope.position_offset + fo.position_offset);
  ref::rope(k, Hkv, d, cfg.rope.theta, false, cfg.rope.position_offset + fo.position_offset);
  const double scale = 1.0 / std::sqrt(double(d));
  Eigen::MatrixXd a(n, H * d);
  layerref::gain_sums gs;
  for (index_t h = 0; h < H; ++h) {
    const index_t hk = h / (H / Hkv);
    a.middleCols(h * d, d) = layerref::head_with_gains(q.middleCols(h * d, d), k.middleCols(hk * d, d),
                                                       v.middleCols(hk * d, d), scale, true, gs);
  }
  const Eigen::MatrixXd want = (a * test::to_double(wo)).rowwise() + row_of(bo);
  const double t_ref = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double g_q = gs.g_q(), g_k = gs.g_k(), uT = test::u<T>();
  const double tol = layerref::model_of(L, n, layerref::backend::cuda).template tol<T>(gs);

  const index_t ldx = dm + 3, ldy = dm + 5;
  const auto dl = bd::upload(ctx, L);
  const device_tensor<T> dx(ctx, x.data(), n, 1, dm, padding{0, ldx - dm}, 7.0);
  device_tensor<T> dy(n, 1, dm, padding{0, ldy - dm});
  host_tensor<T> y(n, 1, dm);
  for (bd::cuda_epilogue epi : {bd::cuda_epilogue::automatic, bd::cuda_epilogue::prefill}) {
    bd::cuda_project_options po;
    po.epilogue = epi;
    device_buffer<unsigned char> ws(static_cast<index_t>(bd::workspace_bytes(ctx, dl, n, po)));
    dy.poison(ctx);
    poison(ctx, ws);
    bd::forward(ctx, dl, dx.cmview(), dy.mview(), ws.data(), ws.bytes(), fo, po);
    ctx.synchronize();
    const readback c = dy.download(ctx, y);
    const double err = nerr_finite(y, want);
    INFO("epilogue " << (epi == bd::cuda_epilogue::prefill ? "prefill" : "automatic") << ": error " << err << " = "
                     << err / uT << " u_T, bound " << tol << " = " << tol / uT << " u_T (g_q " << g_q << ", g_k " << g_k
                     << ")");
    CHECK(c.non_finite == 0);
    CHECK(c.padding_touched == 0);
    CHECK(err <= tol);
    std::printf(
        "layers GQA %s 4096 tokens, epilogue %s: error / bound %.3g (g_q %.3g, g_k %.3g); host reference %.1f s\n",
        to_string(dtype_of_v<T>), epi == bd::cuda_epilogue::prefill ? "prefill" : "automatic", err / tol, g_q, g_k,
        t_ref);
  }
}

/// [large] The layer kernels at sizes past grid_for's cap of 65535 * 16 blocks of 256 threads (268,431,360
/// elements; RMSNorm: 1,048,560 blocks, one per row), so their grid-stride loops take a second pass, in
/// fp16, checked against double arithmetic on the host:
///   RMSNorm  1,100,000 rows of 8 (row stride 11: padding must survive): every element within
///            (u_T + gamma_16(fp32) (1 + u_T)) |y| + eta_T of x / sqrt(mean x^2 + eps) w (an 8-term sum of squares,
///            the mean, eps, sqrtf and 1/x correctly rounded, two products: <= gamma_8 / 2 + 6 u_32 <=
///            gamma_16, then one rounding to T); all rows checked.
///   concat   2^20 rows x 16 heads x (8 + 8), b shared by the heads (head stride 0): 2^28 elements, a copy
///            (so bit-for-bit equality is the specification); all elements checked.
///   RoPE     2^20 tokens x 16 heads x d 32, half style: 2^28 pairs (1 GiB of fp16); the GPU and the host
///            both rotate in double (pow, sin, cos each within 2 ulp of exact), so the two angles differ by
///            <= 8 eps_64 |a| and the rotated values by <= (|x0| + |x1|)(8 eps_64 |a| + 8 eps_64); with the
///            rounding to T: |got - y| <= u_T (|y| + delta) + eta_T + delta. Checked on the first 64 tokens,
///            the last 64 (the second pass covers the last 16) and 64 random ones.
/// Inputs are small integers / 8 or / 16 (exact in fp16). Host cost: filling and checking ~1 GiB of
/// fp16 (a few seconds); device memory ~1.6 GiB.
void layer_kernels_large() {
  using T = Eigen::half;
  namespace ck = basisattn::detail::cuda_kernels;
  const std::uint64_t seed = cudatest::test_seed("layers [large] kernels");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const double uT = test::u<T>(), etaT = test::eta<T>(), eps64 = std::numeric_limits<double>::epsilon();
  constexpr long long cap = 65535LL * 16 * 256;
  {
    INFO("RMSNorm rows beyond the grid cap");
    const index_t rows = 1100000, cols = 8, ld = 11;
    std::uniform_int_distribution<int> pick(-16, 16);
    std::vector<T> xh(static_cast<std::size_t>(rows * ld)), wh(static_cast<std::size_t>(cols));
    for (auto& e : xh) e = from_d<T>(pick(g) / 8.0);
    for (index_t i = 0; i < rows; ++i) xh[static_cast<std::size_t>(i * ld)] = from_d<T>(1.0);  // no zero rows
    for (auto& e : wh) e = from_d<T>(1.0 + pick(g) / 32.0);
    const auto dx = to_device(ctx, xh.data(), rows * ld);
    const auto dw = to_device(ctx, wh.data(), cols);
    const float eps = 1e-6f;
    ck::launch_rms_norm_rows<T>(dx.data(), ld, rows, cols, dw.data(), eps, ctx.stream());
    ctx.synchronize();
    std::vector<T> yh(xh.size());
    dx.download(ctx, yh.data(), rows * ld);
    const double gam = test::gamma<float>(16);
    index_t bad = 0, padding_changed = 0;
    for (index_t i = 0; i < rows; ++i) {
      double ss = 0;
      for (index_t j = 0; j < cols; ++j) ss += to_d(xh[std::size_t(i * ld + j)]) * to_d(xh[std::size_t(i * ld + j)]);
      const double inv = 1.0 / std::sqrt(ss / double(cols) + double(eps));
      for (index_t j = 0; j < ld; ++j) {
        const double got = to_d(yh[std::size_t(i * ld + j)]);
        if (j >= cols) {
          padding_changed += got == to_d(xh[std::size_t(i * ld + j)]) ? 0 : 1;
          continue;
        }
        const double y = to_d(xh[std::size_t(i * ld + j)]) * inv * to_d(wh[std::size_t(j)]);
        if (!(std::abs(got - y) <= (uT + gam * (1 + uT)) * std::abs(y) + etaT)) ++bad;
      }
    }
    CHECK(rows > 65535LL * 16);
    CHECK(bad == 0);
    CHECK(padding_changed == 0);
  }
  {
    INFO("head concatenation beyond the grid cap");
    const index_t rows = index_t(1) << 20, heads = 16, da = 8, db = 8, w = da + db;
    REQUIRE(rows * heads * w > cap);
    auto av = [](index_t i) { return double(i % 2011 - 1005) / 8.0; };  // exact in fp16
    auto bv = [](index_t i) { return double(i % 1999 - 999) / 16.0; };
    std::vector<T> ah(static_cast<std::size_t>(rows * heads * da)), bh(static_cast<std::size_t>(rows * db));
#pragma omp parallel for
    for (index_t i = 0; i < index_t(ah.size()); ++i) ah[std::size_t(i)] = from_d<T>(av(i));
    for (std::size_t i = 0; i < bh.size(); ++i) bh[i] = from_d<T>(bv(index_t(i)));
    const auto da_ = to_device(ctx, ah.data(), static_cast<index_t>(ah.size()));
    const auto db_ = to_device(ctx, bh.data(), static_cast<index_t>(bh.size()));
    device_buffer<T> out(rows * heads * w);
    poison(ctx, out);
    ck::launch_concat_heads<T>(da_.data(), heads * da, da, da, db_.data(), db, 0, db, rows, heads, out.data(),
                               heads * w, ctx.stream());
    ctx.synchronize();
    std::vector<T> oh(static_cast<std::size_t>(rows * heads * w));
    out.download(ctx, oh.data(), static_cast<index_t>(oh.size()));
    index_t wrong = 0;
#pragma omp parallel for reduction(+ : wrong)
    for (index_t t = 0; t < rows; ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t c = 0; c < w; ++c) {
          const double want = c < da ? av((t * heads + h) * da + c) : bv(t * db + (c - da));
          wrong += to_d(oh[std::size_t((t * heads + h) * w + c)]) == want ? 0 : 1;
        }
    CHECK(wrong == 0);
  }
  {
    INFO("RoPE pairs beyond the grid cap");
    const index_t tokens = index_t(1) << 20, heads = 16, d = 32, offset = 3;
    const double theta = 10000;
    REQUIRE(tokens * heads * (d / 2) > cap);
    auto xv = [](index_t t, index_t h, index_t e) { return double((t * 7 + h * 3 + e * 5) % 33 - 16) / 16.0; };
    const index_t row = heads * d;
    device_buffer<T> dx(tokens * row);
    {
      const index_t chunk = 8192;  // tokens per upload
      std::vector<T> buf(static_cast<std::size_t>(chunk * row));
      for (index_t t0 = 0; t0 < tokens; t0 += chunk) {
#pragma omp parallel for
        for (index_t t = 0; t < chunk; ++t)
          for (index_t h = 0; h < heads; ++h)
            for (index_t e = 0; e < d; ++e) buf[std::size_t(t * row + h * d + e)] = from_d<T>(xv(t0 + t, h, e));
        BASISATTN_CUDA_CHECK(cudaMemcpyAsync(dx.data() + t0 * row, buf.data(), buf.size() * sizeof(T),
                                             cudaMemcpyHostToDevice, ctx.stream()));
        ctx.synchronize();
      }
    }
    ck::launch_rope<T>(dx.data(), tokens, heads, d, row, d, 1, theta, false, offset, ctx.stream());
    ctx.synchronize();
    std::vector<index_t> check;
    for (index_t t = 0; t < 64; ++t) check.push_back(t);
    for (index_t t = tokens - 64; t < tokens; ++t) check.push_back(t);
    std::uniform_int_distribution<index_t> pick(0, tokens - 1);
    for (int i = 0; i < 64; ++i) check.push_back(pick(g));
    std::vector<T> got(static_cast<std::size_t>(row));
    index_t bad = 0;
    for (index_t t : check) {
      BASISATTN_CUDA_CHECK(cudaMemcpyAsync(got.data(), dx.data() + t * row, got.size() * sizeof(T),
                                           cudaMemcpyDeviceToHost, ctx.stream()));
      ctx.synchronize();
      for (index_t h = 0; h < heads; ++h)
        for (index_t i = 0; i < d / 2; ++i) {
          const double a = double(offset + t) * std::pow(theta, -2.0 * double(i) / double(d));
          const double x0 = xv(t, h, i), x1 = xv(t, h, i + d / 2);
          const double y0 = x0 * std::cos(a) - x1 * std::sin(a), y1 = x0 * std::sin(a) + x1 * std::cos(a);
          const double delta = (std::abs(x0) + std::abs(x1)) * (8 * eps64 * std::abs(a) + 8 * eps64);
          const double g0 = to_d(got[std::size_t(h * d + i)]), g1 = to_d(got[std::size_t(h * d + i + d / 2)]);
          if (!(std::abs(g0 - y0) <= uT * (std::abs(y0) + delta) + etaT + delta)) ++bad;
          if (!(std::abs(g1 - y1) <= uT * (std::abs(y1) + delta) + etaT + delta)) ++bad;
        }
    }
    CHECK(bad == 0);
  }
}

}  // namespace

TEST_CASE("CUDA MHA/GQA/MQA layers match the CPU backend: fp32") { mha_suite<float>(); }
TEST_CASE("CUDA MHA/GQA/MQA layers match the CPU backend: fp16") { mha_suite<Eigen::half>(); }
TEST_CASE("CUDA MHA/GQA/MQA layers match the CPU backend: bf16") { mha_suite<Eigen::bfloat16>(); }
TEST_CASE("CUDA MLA layers match the CPU backend: fp32") { mla_suite<float>(); }
TEST_CASE("CUDA MLA layers match the CPU backend: fp16") { mla_suite<Eigen::half>(); }
TEST_CASE("CUDA MLA layers match the CPU backend: bf16") { mla_suite<Eigen::bfloat16>(); }
TEST_CASE("CUDA attention layers, small cases for compute-sanitizer", "[sanitize]") { sanitize_suite(); }
TEST_CASE("CUDA GQA layer at 4096 tokens against the double reference: fp16", "[large]") { gqa_long<Eigen::half>(); }
TEST_CASE("CUDA layer kernels (RoPE, RMSNorm, head concatenation) past the grid-stride cap: fp16", "[large]") {
  layer_kernels_large();
}

TEST_CASE("CUDA layers reject bad layers and arguments") {
  cuda_context ctx;
  std::mt19937_64 g(3);
  const index_t dm = 32, H = 4, d = 8, n = 5;
  const auto wq = random_matrix<float>(g, dm, H * d, 0.2), wk = random_matrix<float>(g, dm, H * d, 0.2),
             wv = random_matrix<float>(g, dm, H * d, 0.2), wo = random_matrix<float>(g, H * d, dm, 0.2);
  const bd::mha_weights<float> w{wq.view(), wk.view(), wv.view(), wo.view()};
  const bd::mha_config cfg{dm, H, H, d};
  const auto L = bd::prepare_mha<float>(w, cfg);  // BD on Q/K and V/O, no RoPE
  const auto dl = bd::upload(ctx, L);
  CHECK(bd::is_bd(dl.k));
  CHECK(bd::is_bd(dl.v));

  auto bad = L;
  bad.config.use_rope = true;  // RoPE after a BD K projection is not exact
  CHECK(code_of([&] { (void)bd::upload(ctx, bad); }) == errc::invalid_argument);
  bad = L;
  bad.config.n_heads = 2;  // q maps to 4 heads
  bad.config.n_kv_heads = 2;
  CHECK(code_of([&] { (void)bd::upload(ctx, bad); }) == errc::shape_mismatch);
  bad = L;
  bad.config.use_rope = true;
  bad.config.rope.theta = -1;
  bad.k = bd::dense_projection<float>{matrix<float>(dm, H * d), {}};
  CHECK(code_of([&] { (void)bd::upload(ctx, bad); }) == errc::invalid_argument);

  const std::size_t need = bd::workspace_bytes(ctx, dl, n);
  device_buffer<unsigned char> ws(static_cast<index_t>(need));
  device_buffer<float> x(n * (dm + 1)), y(n * (dm + 1));
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), n, dm + 1), matrix_view<float>(y.data(), n, dm),
                      ws.data(), ws.bytes());
        }) == errc::shape_mismatch);  // x has d_model + 1 columns
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), n, dm), matrix_view<float>(y.data(), n - 1, dm),
                      ws.data(), ws.bytes());
        }) == errc::shape_mismatch);  // tokens disagree
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), n, dm), matrix_view<float>(y.data(), n, dm),
                      ws.data(), need - 1);
        }) == errc::invalid_argument);  // workspace too small
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), 0, dm), matrix_view<float>(y.data(), 0, dm),
                      ws.data(), ws.bytes());
        }) == errc::invalid_argument);  // no tokens
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), n, dm), matrix_view<float>(y.data(), n, dm),
                      ws.data(), ws.bytes());
          ctx.synchronize();
        }) == errc::io);  // and the well-formed call runs

  // MLA: a latent norm of the wrong length, a head dim above the attention kernel's limit.
  const index_t Lr = 24, dn = 8, dr = 4, dv = 8;
  const auto mq = random_matrix<float>(g, dm, H * (dn + dr), 0.2), ma = random_matrix<float>(g, dm, Lr + dr, 0.2),
             mb = random_matrix<float>(g, Lr, H * (dn + dv), 0.2), mo = random_matrix<float>(g, H * dv, dm, 0.2);
  const std::vector<float> norm(static_cast<std::size_t>(Lr), 1.0f);
  const bd::mla_weights<float> mw{mq.view(), ma.view(), norm.data(), mb.view(), mo.view()};
  const auto ML = bd::prepare_mla<float>(mw, bd::mla_config{dm, H, Lr, dn, dr, dv});
  CHECK(code_of([&] { (void)bd::upload(ctx, ML); }) == errc::io);
  auto mbad = ML;
  mbad.kv_a_norm.pop_back();
  CHECK(code_of([&] { (void)bd::upload(ctx, mbad); }) == errc::shape_mismatch);
  mbad = ML;
  mbad.config.qk_rope_dim = 5;  // odd rope dim (and q no longer matches)
  CHECK(code_of([&] { (void)bd::upload(ctx, mbad); }) == errc::invalid_argument);
}

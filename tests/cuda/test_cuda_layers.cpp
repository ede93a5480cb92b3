// CUDA attention layers vs the CPU oracle: bd::forward(ctx, upload(layer), ...) against
// bd::forward(cpu{}, layer, ...) on the same prepared layer, for MHA, GQA and MQA (no RoPE, RoPE
// interleaved and half, with and without biases, causal or not) and MLA (small DeepSeek-V2-like
// shapes and DeepSeek-V2-Lite's head dims with 2 heads; dense, BD per-side and joint bases), dense
// and BD, in fp32, fp16 and bf16. Every case uses fresh random weights and inputs (the seed is
// printed on failure), padded row strides for x and y, and poisons y and the whole workspace (all
// bytes 0xFF: NaN in every dtype) before each run, so an unwritten output or an intermediate read
// before it is written shows up as a non-finite element. Each case runs twice: with the default
// projection epilogue (cuBLASLt where available) and with cuda_epilogue::prefill.
//
// Bound on the normalised error nerr = ||y_gpu - y_cpu||_F / ||y_cpu||_F: the CPU layer test
// (tests/test_bd_layers.cpp) bounds the CPU layer's error against a double reference by 8 u (16-bit
// storage) and 32 u (fp32) on these shapes; both backends round the same fp32 sums to T at the same
// points (only the summation order differs), so each is within that bound of the exact result and
// they are within twice that bound of each other: 16 u and 64 u.
// Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "cuda_test_util.hpp"

#include <basisattn/bd/layers.hpp>
#include <basisattn/cpu/layers.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/layers.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::comparison;
using cudatest::compare;
using cudatest::fresh_seed;
using cudatest::poison;

using cudatest::from_d;
using cudatest::to_d;

template <class T>
double tolerance() {
  return (std::is_same_v<T, float> ? 64 : 16) * unit_roundoff(dtype_of_v<T>);
}

template <class T>
matrix<T> random_matrix(std::mt19937_64& g, index_t rows, index_t cols, double scale) {
  std::normal_distribution<double> nd(0.0, scale);
  matrix<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = from_d<T>(nd(g));
  return m;
}
template <class T>
std::vector<T> random_vector(std::mt19937_64& g, index_t n, double scale, double mean = 0.0) {
  std::normal_distribution<double> nd(mean, scale);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = from_d<T>(nd(g));
  return v;
}


/// Run host layer HL on the CPU and, uploaded, on the GPU (default epilogue, then prefill); compare.
template <class T, class HL>
void check_layer(const cuda_context& ctx, const HL& layer, index_t d_model, index_t n, const bd::forward_options& fo,
                 std::mt19937_64& g) {
  const index_t ldx = d_model + 3, ldy = d_model + 5;
  const matrix<T> x = random_matrix<T>(g, n, d_model, 1.0);
  matrix<T> want(n, d_model);
  bd::forward(cpu{}, layer, x.view(), want.view(), fo);

  std::vector<T> xh(static_cast<std::size_t>(n * ldx), from_d<T>(7.0));
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d_model; ++j) xh[static_cast<std::size_t>(i * ldx + j)] = x(i, j);
  const auto dl = bd::upload(ctx, layer);
  const auto dx = to_device(ctx, xh.data(), static_cast<index_t>(xh.size()));
  device_buffer<T> dy(n * ldy);
  for (bd::cuda_epilogue epi : {bd::cuda_epilogue::automatic, bd::cuda_epilogue::prefill}) {
    bd::cuda_project_options po;
    po.epilogue = epi;
    device_buffer<unsigned char> ws(static_cast<index_t>(bd::forward_workspace_bytes(ctx, dl, n, po)));
    for (int run = 0; run < 2; ++run) {  // the second run goes through the projections' cached plans
      poison(ctx, dy);
      poison(ctx, ws);
      bd::forward(ctx, dl, matrix_view<const T>(dx.data(), n, d_model, ldx), matrix_view<T>(dy.data(), n, d_model, ldy),
                  ws.data(), ws.bytes(), fo, po);
      ctx.synchronize();
      std::vector<T> y(static_cast<std::size_t>(n * ldy));
      dy.download(ctx, y.data(), n * ldy);
      const comparison c = compare(y, ldy, want);
      INFO("dtype " << to_string(dtype_of_v<T>) << ", epilogue " << (epi == bd::cuda_epilogue::prefill ? "prefill" : "automatic")
                    << ", run " << run << ": nerr " << c.nerr << " = " << c.nerr / unit_roundoff(dtype_of_v<T>)
                    << " u (bound " << tolerance<T>() << ")");
      CHECK(c.non_finite == 0);
      CHECK(c.padding_touched == 0);
      CHECK(c.nerr <= tolerance<T>());
    }
  }
}

enum class rope_kind { none, interleaved, half };

template <class T>
void mha_suite() {
  const std::uint64_t seed = fresh_seed();
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
        cfg.causal = Hkv != 2;          // GQA runs bidirectional
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
  const std::uint64_t seed = fresh_seed();
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
        INFO("MLA: d_model " << sh.dm << ", heads " << sh.H << ", L " << sh.Lr << ", nope/rope/v " << sh.dn << "/" << sh.dr
                             << "/" << sh.dv << ", rope style " << static_cast<int>(rk) << ", variant "
                             << (variant == 0 ? "dense" : variant == 1 ? "BD per-side" : "BD joint"));
        check_layer<T>(ctx, L, sh.dm, sh.n, fo, g);
      }
    }
  }
}

template <class F>
errc code_of(F&& f) {
  try {
    f();
  } catch (const basisattn::error& e) {
    return e.code();
  }
  return errc::io;  // "no error" marker for these checks
}

}  // namespace

TEST_CASE("CUDA MHA/GQA/MQA layers match the CPU backend: fp32") { mha_suite<float>(); }
TEST_CASE("CUDA MHA/GQA/MQA layers match the CPU backend: fp16") { mha_suite<Eigen::half>(); }
TEST_CASE("CUDA MHA/GQA/MQA layers match the CPU backend: bf16") { mha_suite<Eigen::bfloat16>(); }
TEST_CASE("CUDA MLA layers match the CPU backend: fp32") { mla_suite<float>(); }
TEST_CASE("CUDA MLA layers match the CPU backend: fp16") { mla_suite<Eigen::half>(); }
TEST_CASE("CUDA MLA layers match the CPU backend: bf16") { mla_suite<Eigen::bfloat16>(); }

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

  const std::size_t need = bd::forward_workspace_bytes(ctx, dl, n);
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
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), n, dm), matrix_view<float>(y.data(), n, dm), ws.data(),
                      need - 1);
        }) == errc::invalid_argument);  // workspace too small
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), 0, dm), matrix_view<float>(y.data(), 0, dm), ws.data(),
                      ws.bytes());
        }) == errc::invalid_argument);  // no tokens
  CHECK(code_of([&] {
          bd::forward(ctx, dl, matrix_view<const float>(x.data(), n, dm), matrix_view<float>(y.data(), n, dm), ws.data(),
                      ws.bytes());
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

// Bad input to BD preparation and projections: the library's error with a message naming the
// problem; nothing crashes.
#include <basisattn/cpu/layers.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <catch2/catch.hpp>

#include "test_util.hpp"
#include "expect_error.hpp"

#include <cmath>
#include <vector>

using namespace basisattn;
using Catch::Contains;

namespace {
using test::expect_error;
std::vector<matrix_view<const float>> views(const std::vector<matrix<float>>& m) {
  std::vector<matrix_view<const float>> v;
  for (const auto& x : m) v.push_back(x.view());
  return v;
}
}  // namespace

TEST_CASE("factorize rejects bad shapes and r >= m") {
  test::seed(1);
  std::vector<matrix<float>> h = {test::random_matrix<float>(8, 8)};
  expect_error([&] { bd::factorize<float>(views(h)); }, errc::invalid_argument, "must be smaller than m");
  h = {test::random_matrix<float>(20, 4), test::random_matrix<float>(20, 5)};
  expect_error([&] { bd::factorize<float>(views(h)); }, errc::shape_mismatch, "head 1 is 20x5");
  expect_error([&] { bd::factorize<float>(std::vector<matrix_view<const float>>{}); }, errc::invalid_argument,
               "no heads");
  auto a = test::random_matrix<float>(20, 4);
  auto b = test::random_matrix<float>(5, 3);
  expect_error([&] { bd::factorize_pair<float>(a.view(), b.view()); }, errc::shape_mismatch, "B must have");
  bd::prepare_options o;
  o.swap_gain = 1.0;
  h = {a};
  expect_error([&] { bd::factorize<float>(views(h), o); }, errc::invalid_argument, "swap_gain");
}

TEST_CASE("factorize rejects NaN and Inf weights") {
  test::seed(2);
  std::vector<matrix<float>> h = {test::random_matrix<float>(20, 4), test::random_matrix<float>(20, 4)};
  h[1](7, 2) = std::nanf("");
  expect_error([&] { bd::factorize<float>(views(h)); }, errc::non_finite,
               "A of head 1 has a non-finite value at (7, 2)");
  h[1](7, 2) = INFINITY;
  expect_error([&] { bd::factorize<float>(views(h)); }, errc::non_finite, "head 1");
  auto a = test::random_matrix<float>(20, 4);
  auto b = test::random_matrix<float>(4, 3);
  b(1, 1) = -INFINITY;
  expect_error([&] { bd::factorize_pair<float>(a.view(), b.view()); }, errc::non_finite, "B has a non-finite value");
}

TEST_CASE("rank-deficient heads and singular bases are reported, for every strategy") {
  test::seed(3);
  auto a = test::random_matrix<double>(30, 6);
  for (int i = 0; i < 30; ++i) a(i, 5) = a(i, 0) - 2 * a(i, 3);  // rank 5
  std::vector<matrix_view<const double>> v = {a.view()};
  for (auto st : {bd::strategy::first_r, bd::strategy::residual_min, bd::strategy::shared_pivot}) {
    bd::prepare_options o;
    o.select = st;
    expect_error([&] { bd::factorize<double>(v, o); }, errc::rank_deficient, "numerical rank 5 < r = 6");
  }
  // Columns sin(x), sin(x + 1), sin(x + 2) are linearly dependent (sin(x+2) = 2 cos 1 sin(x+1) - sin x),
  // but stored in float they are full rank to within float noise. By default such a basis is kept
  // (BD reproduces the stored values, noise included, to rounding); when a stricter min_rcond refuses
  // it, the error says why: the head is rank deficient at float precision.
  std::vector<float> s(40 * 3);
  for (int i = 0; i < 40; ++i)
    for (int j = 0; j < 3; ++j) s[i * 3 + j] = std::sin(0.37f * float(i) + float(j));
  const std::vector<matrix_view<const float>> sv = {matrix_view<const float>(s.data(), 40, 3)};
  CHECK_NOTHROW(bd::factorize<float>(sv));
  bd::prepare_options strict;
  strict.min_rcond = 1e-4;
  expect_error([&] { bd::factorize<float>(sv, strict); }, errc::rank_deficient, "numerical rank 2 < r = 3");
  // Full-rank A whose first r rows are singular: first_r is refused, shared_pivot works.
  auto c = test::random_matrix<double>(30, 6);
  for (int j = 0; j < 6; ++j) c(4, j) = c(1, j) + c(2, j);
  v = {c.view()};
  bd::prepare_options o;
  o.select = bd::strategy::first_r;
  expect_error([&] { bd::factorize<double>(v, o); }, errc::singular_basis, "shared_pivot may find a better basis");
  o.select = bd::strategy::shared_pivot;
  CHECK_NOTHROW(bd::factorize<double>(v, o));
}

TEST_CASE("coefficients that overflow the storage type are refused, not stored as Inf") {
  test::seed(4);
  auto a = test::random_matrix<double>(12, 2);
  a(0, 0) = 1;
  a(0, 1) = 0;
  a(1, 0) = 1;
  a(1, 1) = 1e-6;  // first_r basis [[1,0],[1,1e-6]]: coefficients ~1e6, beyond fp16's 65504
  std::vector<matrix_view<const double>> v = {a.view()};
  bd::prepare_options o;
  o.select = bd::strategy::first_r;
  // By default such a basis is refused for its error growth already ...
  expect_error([&] { bd::factorize<Eigen::half>(v, o); }, errc::singular_basis, "error growth");
  // ... and with that check relaxed, the overflow itself is caught when rounding.
  o.max_error_growth = 1e30;
  expect_error([&] { bd::factorize<Eigen::half>(v, o).coefficients<Eigen::half>(0); }, errc::singular_basis,
               "does not fit in f16");
  CHECK_NOTHROW(bd::factorize<float>(v, o).coefficients<float>(0));
}

TEST_CASE("projections reject mismatched shapes, small workspaces and non-finite input") {
  test::seed(5);
  std::vector<matrix<float>> h = {test::random_matrix<float>(16, 4), test::random_matrix<float>(16, 4)};
  const auto sb = bd::factorize<float>(views(h));
  const auto p = bd::make_bd_projection<float>(sb);
  auto x = test::random_matrix<float>(10, 16);
  matrix<float> y(10, 8), bad(10, 7), short_y(9, 8);
  expect_error([&] { bd::project(cpu{}, p, x.view(), bad.view()); }, errc::shape_mismatch, "y has 7 columns");
  expect_error([&] { bd::project(cpu{}, p, x.view(), short_y.view()); }, errc::shape_mismatch, "x has 10 rows");
  auto x2 = test::random_matrix<float>(10, 15);
  expect_error([&] { bd::project(cpu{}, p, x2.view(), y.view()); }, errc::shape_mismatch, "x has 15 columns");
  x(3, 3) = std::nanf("");
  expect_error([&] { bd::project(cpu{}, p, x.view(), y.view()); }, errc::non_finite,
               "project: x has a non-finite value");
  x(3, 3) = 0;
  unsigned char tiny[8];
  const auto dense =
      bd::make_dense_projection<Eigen::half>(matrix_view<const float>(h[0].view()).t().block(0, 0, 4, 16).t());
  matrix<Eigen::half> xh(10, 16), yh(10, 4);
  expect_error([&] { bd::project(cpu{}, dense, xh.view(), yh.view(), tiny, sizeof tiny); }, errc::invalid_argument,
               "workspace of 8 bytes");
  // Strided columns are refused with a clear message.
  matrix_view<const float> xs(x.data(), 10, 8, 16, 2);
  matrix<float> y8(10, 8);
  const auto p8 = bd::make_dense_projection<float>(test::random_matrix<float>(8, 8).view());
  expect_error([&] { bd::project(cpu{}, p8, xs, y8.view()); }, errc::invalid_argument, "contiguous");
  expect_error([&] { bd::slice_heads(p, 1, 2); }, errc::invalid_argument, "outside [0, 2)");
}

TEST_CASE("layer preparation rejects RoPE with Q/K BD, bad shapes and split kv groups") {
  test::seed(6);
  const index_t dm = 32, H = 4, Hkv = 2, d = 8;
  auto wq = test::random_matrix<float>(dm, H * d), wk = test::random_matrix<float>(dm, Hkv * d),
       wv = test::random_matrix<float>(dm, Hkv * d), wo = test::random_matrix<float>(H * d, dm);
  bd::mha_weights<float> w{wq.view(), wk.view(), wv.view(), wo.view()};
  bd::mha_config cfg{dm, H, Hkv, d};
  cfg.use_rope = true;
  expect_error([&] { bd::prepare_mha<float>(w, cfg); }, errc::invalid_argument, "not exact with RoPE");
  bd::mha_options o;
  o.bd_qk = false;
  const auto L = bd::prepare_mha<float>(w, cfg, o);
  expect_error([&] { L.shard(1, 2); }, errc::invalid_argument, "split a kv group");
  cfg.use_rope = false;
  bd::mha_weights<float> w2 = w;
  w2.wk = wq.view();  // wrong width
  expect_error([&] { bd::prepare_mha<float>(w2, cfg); }, errc::shape_mismatch, "wk is 32x32, expected 32x16");
  cfg.n_kv_heads = 3;
  expect_error([&] { bd::prepare_mha<float>(w, cfg); }, errc::invalid_argument, "not a multiple of n_kv_heads");
  cfg.n_kv_heads = Hkv;
  // A NaN/Inf names the entry point, the caller's argument and the caller's coordinates (column 11 of
  // wv is column 3 of kv head 1), and wv and wo give different texts.
  wv(3, 11) = INFINITY;
  expect_error([&] { bd::prepare_mha<float>(w, cfg); }, errc::non_finite,
               "prepare_mha: wv has a non-finite value at (3, 11)");
  wv(3, 11) = 0;
  wo(5, 7) = NAN;
  expect_error([&] { bd::prepare_mha<float>(w, cfg); }, errc::non_finite,
               "prepare_mha: wo has a non-finite value at (5, 7)");
  wo(5, 7) = 0;
  std::vector<float> bv(static_cast<std::size_t>(Hkv * d), 0.0f);
  bv[9] = NAN;
  bd::mha_weights<float> wb = w;
  wb.bv = bv.data();
  expect_error([&] { bd::prepare_mha<float>(wb, cfg); }, errc::non_finite,
               "prepare_mha: bv has a non-finite value at (0, 9)");
  matrix<float> x(5, dm + 1), y(5, dm);
  const auto L2 = bd::prepare_mha<float>(w, cfg);
  expect_error([&] { bd::forward(cpu{}, L2, x.view(), y.view()); }, errc::shape_mismatch, "x has 33 columns");
}

TEST_CASE("MLA preparation rejects inconsistent shapes") {
  test::seed(7);
  const index_t dm = 64, H = 2, Lr = 32, dn = 8, dr = 4, dv = 8;
  auto wq = test::random_matrix<float>(dm, H * (dn + dr)), wa = test::random_matrix<float>(dm, Lr + dr),
       wb = test::random_matrix<float>(Lr, H * (dn + dv)), wo = test::random_matrix<float>(H * dv, dm);
  auto g = test::random_vector<float>(Lr);
  bd::mla_weights<float> w{wq.view(), wa.view(), g.data(), wb.view(), wo.view()};
  bd::mla_config cfg{dm, H, Lr, dn, dr, dv};
  CHECK_NOTHROW(bd::prepare_mla<float>(w, cfg));
  cfg.qk_rope_dim = 3;
  expect_error([&] { bd::prepare_mla<float>(w, cfg); }, errc::invalid_argument, "must be even");
  cfg.qk_rope_dim = dr;
  cfg.v_head_dim = 6;
  expect_error([&] { bd::prepare_mla<float>(w, cfg); }, errc::shape_mismatch, "wkv_b is 32x32, expected 32x28");
  cfg.v_head_dim = dv;
  wb(17, 20) = NAN;
  expect_error([&] { bd::prepare_mla<float>(w, cfg); }, errc::non_finite,
               "prepare_mla: wkv_b has a non-finite value at (17, 20)");
  wb(17, 20) = 0;
  w.kv_a_norm = nullptr;
  expect_error([&] { bd::prepare_mla<float>(w, cfg); }, errc::invalid_argument, "kv_a_norm is missing");
}

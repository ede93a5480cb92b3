// Core: views, dtypes, errors, backend traits, the CPU backend's one GEMM (detail::cpu_gemm).
#include <basisattn/core/backend.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/cpu/gemm.hpp>

#include <catch2/catch.hpp>

#include "test_util.hpp"

#include <cmath>
#include <string>
#include <vector>

using namespace basisattn;

static_assert(is_backend_v<cpu>);
static_assert(std::is_same_v<backend_of_t<const cpu&>, cpu>);  // a tag selects itself
static_assert(!is_backend_v<int>);
static_assert(supports_storage_v<cpu, Eigen::half>);
static_assert(!is_storage_type_v<int>);
static_assert(std::is_same_v<compute_t<Eigen::bfloat16>, float>);
static_assert(std::is_same_v<compute_t<double>, double>);

TEST_CASE("matrix_view strides, transpose and blocks address the right elements") {
  std::vector<float> buf(6 * 5);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = float(i);
  matrix_view<float> v(buf.data(), 4, 3, 5);  // 4x3 inside a 6x5 row-major buffer
  CHECK(v(2, 1) == 11.f);
  auto t = v.t();
  CHECK(t.rows == 3);
  CHECK(t(1, 2) == 11.f);
  auto b = v.block(1, 1, 2, 2);
  CHECK(b(1, 0) == v(2, 1));
  CHECK_THROWS_AS(v.checked_block(3, 0, 2, 1), basisattn::error);
  matrix_view<const float> c = v;  // const conversion
  CHECK(c(3, 2) == 17.f);
}

TEST_CASE("tensor3_view slices heads out of a [tokens, heads*dim] matrix") {
  std::vector<double> buf(4 * 6);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = double(i);
  matrix_view<double> m(buf.data(), 4, 6);
  auto t = tensor3_view<double>::from_matrix(m, 3);  // 3 heads of 2
  CHECK(t.extent[2] == 2);
  CHECK(t(2, 1, 1) == 2 * 6 + 1 * 2 + 1);
  auto h = t.slice1(2);
  CHECK(h(3, 0) == 3 * 6 + 4);
  CHECK_THROWS_AS(tensor3_view<double>::from_matrix(m, 4), basisattn::error);
}

TEST_CASE("unit roundoff and conversions follow each storage type") {
  CHECK(unit_roundoff(dtype::f32) == std::ldexp(1.0, -24));
  CHECK(unit_roundoff(dtype::f16) == std::ldexp(1.0, -11));
  CHECK(unit_roundoff(dtype::bf16) == std::ldexp(1.0, -8));
  // 1 + 2^-11 is exactly halfway between two halves: rounds to even (1.0).
  CHECK(float(detail::from_compute<Eigen::half>(1.0f + std::ldexp(1.0f, -11))) == 1.0f);
  CHECK(float(detail::from_compute<Eigen::bfloat16>(3.0f)) == 3.0f);
  // From double, rounding is done once: 1 + 2^-11 + 2^-40 is above the midpoint between 1 and
  // 1 + 2^-10, so it must round up, although rounding first to float would land on the midpoint.
  const double above = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  CHECK(float(detail::from_compute<Eigen::half>(above)) == 1.0f + std::ldexp(1.0f, -10));
  CHECK(float(detail::from_compute<Eigen::half>(1.0 + std::ldexp(1.0, -11) - std::ldexp(1.0, -40))) == 1.0f);
  const double above_bf = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  CHECK(float(detail::from_compute<Eigen::bfloat16>(above_bf)) == 1.0f + std::ldexp(1.0f, -7));
  CHECK(float(detail::from_compute<Eigen::half>(-above)) == -(1.0f + std::ldexp(1.0f, -10)));
}

TEMPLATE_TEST_CASE("rounds_finite_below is where rounding to the type starts giving infinity", "", Eigen::half,
                   Eigen::bfloat16, float) {
  const double t = detail::rounds_finite_below<TestType>();
  auto rounded = [](double x) { return static_cast<double>(static_cast<float>(detail::from_compute<TestType>(x))); };
  CHECK(std::isinf(rounded(t)));
  CHECK(std::isinf(rounded(-t)));
  CHECK(rounded(std::nextafter(t, 0.0)) == detail::max_finite<TestType>());
  CHECK(rounded(-std::nextafter(t, 0.0)) == -detail::max_finite<TestType>());
}

TEST_CASE("errors carry a code and a message naming the problem") {
  try {
    BASISATTN_REQUIRE(1 + 1 == 3, shape_mismatch, "x has ", 3, " columns");
    FAIL("no throw");
  } catch (const basisattn::error& e) {
    CHECK(e.code() == errc::shape_mismatch);
    CHECK(std::string(e.what()) == "basisattn: shape_mismatch: x has 3 columns");
  }
}

TEST_CASE("require_finite finds NaN and Inf in every storage type") {
  std::vector<float> f = {1.f, 2.f, INFINITY};
  CHECK_THROWS_AS(detail::require_finite(f.data(), 3, "bias"), basisattn::error);
  std::vector<Eigen::half> h = {Eigen::half(1.f), Eigen::half(std::nanf(""))};
  CHECK_THROWS_WITH(detail::require_finite(matrix_view<const Eigen::half>(h.data(), 1, 2), "w"),
                    Catch::Contains("w has a non-finite value at (0, 1)"));
  std::vector<double> d = {1.0, 2.0};
  CHECK_NOTHROW(detail::require_finite(d.data(), 2, "ok"));
}

TEST_CASE("the CPU GEMM matches a double product for every transposition, beta and stride") {
  // Whatever the provider (backend_traits<cpu>::gemm), C = alpha op(A) op(B) + beta C is a sum of k
  // products and the scaled old value in float: componentwise |C - C_64| <= gamma_{k+1}(u_32)
  // (|alpha| |op(A)||op(B)| + |beta| |C0|) + gamma_{k+1}(u_64) (the same), Higham eq. 3.13. beta = 0
  // must ignore C0 even when it is NaN.
  const std::string provider = backend_traits<cpu>::gemm;
  INFO("GEMM provider: " << provider);
  CHECK((provider == "eigen" || provider == "onednn"));
  test::seed(31);
  struct shape {
    index_t m, n, k;
  };
  for (const shape sh : {shape{1, 1, 1}, shape{1, 37, 5}, shape{17, 1, 9}, shape{33, 29, 0}, shape{64, 48, 130}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (const float beta : {0.0f, 1.0f, -0.5f}) {
          const index_t m = sh.m, n = sh.n, k = sh.k, pad = 3;
          // A stored (k x m) when transposed, else (m x k); every row padded by `pad` to test strides.
          const index_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
          const auto a = test::random_matrix<float>(ar, ac + pad), b = test::random_matrix<float>(br, bc + pad);
          auto c = test::random_matrix<float>(m, n + pad);
          if (beta == 0.0f) c(0, 0) = NAN;
          const auto before = c;
          const Eigen::MatrixXd ad = test::to_double(a).leftCols(ac), bd = test::to_double(b).leftCols(bc),
                                c0 = test::to_double(c).leftCols(n);
          const Eigen::MatrixXd opa = ta ? Eigen::MatrixXd(ad.transpose()) : ad,
                                opb = tb ? Eigen::MatrixXd(bd.transpose()) : bd;
          const float alpha = 0.75f;
          detail::cpu_gemm<float>(ta, tb, m, n, k, alpha, a.data(), ac + pad, b.data(), bc + pad, beta, c.data(),
                                  n + pad);
          Eigen::MatrixXd want = alpha * opa * opb, mag = std::abs(alpha) * opa.cwiseAbs() * opb.cwiseAbs();
          if (beta != 0.0f) {
            want += beta * c0;
            mag += std::abs(beta) * c0.cwiseAbs();
          }
          const double g = test::gamma<float>(k + 1) + test::gamma<double>(k + 1);
          const Eigen::MatrixXd got = test::to_double(c).leftCols(n);
          INFO("m " << m << " n " << n << " k " << k << " ta " << ta << " tb " << tb << " beta " << beta);
          CHECK(test::max_error_ratio(got, want, (g * mag).array() + 1e-300) <= 1);
          bool padding_kept = true;  // the padding of C is left alone (a copy: bitwise)
          for (index_t i = 0; i < m; ++i)
            for (index_t j = n; j < n + pad; ++j) padding_kept = padding_kept && c(i, j) == before(i, j);
          CHECK(padding_kept);
        }
}

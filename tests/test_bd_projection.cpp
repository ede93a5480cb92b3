// CPU runtime of BD and dense projections against a plain double oracle, every storage type,
// with and without bias, gathered and leading basis channels, several token counts and threads.
#include <basisattn/cpu/projection.hpp>

#include <catch2/catch.hpp>

#include "test_util.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace basisattn;
using test::index_t;

namespace {

void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n);
}

template <class T>
void bd_projection_case(bool with_bias, index_t tokens, int threads) {
  set_threads(threads);
  test::seed(100 + tokens + 7 * with_bias);
  const index_t G = 3, m = 40, r = 8;
  std::vector<matrix<T>> a;
  std::vector<std::vector<T>> b;
  std::vector<matrix_view<const T>> av;
  std::vector<const T*> bp;
  for (index_t g = 0; g < G; ++g) {
    a.push_back(test::random_matrix<T>(m, r));
    b.push_back(test::random_vector<T>(r));
  }
  for (index_t g = 0; g < G; ++g) {
    av.push_back(a[g].view());
    bp.push_back(b[g].data());
  }
  const auto sb = bd::factorize<T>(av);
  const auto p = bd::make_bd_projection<T>(sb, with_bias ? bp : std::vector<const T*>{});
  CHECK(p.bytes() == std::size_t((m - r) * G * r + (with_bias ? G * r : 0)) * sizeof(T));
  const auto x = test::random_matrix<T>(tokens, m);

  // Oracle: K'_g = (x A_g + b_g) A_S^-1, all in double from the stored values.
  const Eigen::MatrixXd xd = test::to_double(x);
  Eigen::MatrixXd want(tokens, G * r);
  for (index_t g = 0; g < G; ++g) {
    Eigen::MatrixXd ad = test::to_double(a[g]), as(r, r);
    for (index_t i = 0; i < r; ++i) as.row(i) = ad.row(p.basis[i]);
    Eigen::MatrixXd k = xd * ad;
    if (with_bias)
      for (index_t j = 0; j < r; ++j) k.col(j).array() += static_cast<double>(detail::to_compute<compute_t<T>>(b[g][j]));
    want.middleCols(g * r, r) = k * as.inverse();
  }
  // Error sources: C and the bias rounded to T (relative u, amplified by |C|), the compute-type
  // GEMM over m - r terms, and the output rounded to T. 16 u (1 + max|C|) bounds their sum here.
  const double tol = 16 * test::u<T>() * (1 + p.report.max_abs_coeff);

  matrix<T> y(tokens, G * r);
  test::poison(y);
  bd::project(cpu{}, p, x.view(), y.view());
  INFO(to_string(dtype_of_v<T>) << " tokens " << tokens << " bias " << with_bias << " threads " << threads);
  CHECK(test::rel_error(test::to_double(y), want) <= tol);

  // The same projection with the input channels permuted upstream so that the basis is leading:
  // the zero-copy path must give the same numbers.
  bd::bd_projection<T> lead = p;
  std::vector<index_t> perm = p.basis;
  perm.insert(perm.end(), p.rest.begin(), p.rest.end());
  for (index_t i = 0; i < r; ++i) lead.basis[i] = i;
  for (index_t l = 0; l < m - r; ++l) lead.rest[l] = r + l;
  REQUIRE(lead.basis_leading());
  matrix<T> xp(tokens, m);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < m; ++j) xp(t, j) = x(t, perm[j]);
  matrix<T> y2(tokens, G * r);
  test::poison(y2);
  bd::project(cpu{}, lead, xp.view(), y2.view());
  CHECK(test::rel_error(test::to_double(y2), want) <= tol);

  // Caller-owned workspace of exactly the queried size, and a strided output.
  std::vector<unsigned char> ws(bd::project_workspace_bytes(cpu{}, p, tokens));
  matrix<T> wide(tokens, G * r + 5);
  test::poison(wide);
  matrix_view<T> ys(wide.data() + 2, tokens, G * r, G * r + 5);
  bd::project(cpu{}, p, x.view(), ys, ws.data(), ws.size());
  CHECK(test::rel_error(test::to_double(matrix_view<const T>(ys)), want) <= tol);
  for (index_t t = 0; t < tokens; ++t) CHECK(std::isnan(static_cast<double>(detail::to_compute<float>(wide(t, 0)))));
  set_threads(1);
}

template <class T>
void dense_projection_case(index_t tokens, int threads) {
  set_threads(threads);
  test::seed(200 + tokens);
  const auto w = test::random_matrix<T>(24, 40);
  const auto b = test::random_vector<T>(40);
  const auto x = test::random_matrix<T>(tokens, 24);
  const auto p = bd::make_dense_projection<T>(w.view(), b.data());
  CHECK(p.bytes() == std::size_t(24 * 40 + 40) * sizeof(T));
  Eigen::MatrixXd want = test::to_double(x) * test::to_double(w);
  for (index_t j = 0; j < 40; ++j) want.col(j).array() += static_cast<double>(detail::to_compute<compute_t<T>>(b[j]));
  matrix<T> y(tokens, 40);
  test::poison(y);
  bd::project(cpu{}, p, x.view(), y.view());
  INFO(to_string(dtype_of_v<T>) << " tokens " << tokens << " threads " << threads);
  CHECK(test::rel_error(test::to_double(y), want) <= 16 * test::u<T>());
  set_threads(1);
}

}  // namespace

TEMPLATE_TEST_CASE("BD projection matches (x A + b) A_S^-1 computed in double", "", float, double, Eigen::half,
                   Eigen::bfloat16) {
  for (index_t tokens : {1, 7, 300, 777})
    for (int threads : {1, 2}) {
      bd_projection_case<TestType>(true, tokens, threads);
      bd_projection_case<TestType>(false, tokens, threads);
    }
}

TEMPLATE_TEST_CASE("dense projection matches x W + b computed in double", "", float, double, Eigen::half,
                   Eigen::bfloat16) {
  for (index_t tokens : {1, 7, 300, 777})
    for (int threads : {1, 2}) dense_projection_case<TestType>(tokens, threads);
}

TEST_CASE("slices of a projection are the matching columns of the whole") {
  test::seed(300);
  std::vector<matrix<float>> a;
  std::vector<matrix_view<const float>> av;
  for (int g = 0; g < 4; ++g) a.push_back(test::random_matrix<float>(30, 6));
  for (auto& m : a) av.push_back(m.view());
  const auto p = bd::make_bd_projection<float>(bd::factorize<float>(av));
  const auto s = bd::slice_heads(p, 1, 2);
  const auto x = test::random_matrix<float>(9, 30);
  matrix<float> y(9, 24), ys(9, 12);
  bd::project(cpu{}, p, x.view(), y.view());
  bd::project(cpu{}, s, x.view(), ys.view());
  CHECK((test::to_double(ys) - test::to_double(y).middleCols(6, 12)).norm() == 0.0);
  CHECK(s.bytes() * 2 == p.bytes());
  const auto d = bd::make_dense_projection<float>(test::random_matrix<float>(30, 10).view());
  const auto dc = bd::slice_columns(d, 3, 4);
  matrix<float> yd(9, 10), yc(9, 4);
  bd::project(cpu{}, d, x.view(), yd.view());
  bd::project(cpu{}, dc, x.view(), yc.view());
  CHECK((test::to_double(yc) - test::to_double(yd).middleCols(3, 4)).norm() == 0.0);
}

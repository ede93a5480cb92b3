// CPU runtime of BD and dense projections against a plain double oracle, every storage type,
// with and without bias, gathered and leading basis channels, several token counts and threads.
#include <basisattn/cpu/projection.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <catch2/catch.hpp>

#include "test_util.hpp"

#include <optional>
#include <utility>

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

/// Componentwise bound of one output entry of bd::project against the same sum computed in double
/// from the same stored values (want), for a sum of `terms` terms whose absolute values add up to
/// mag. The CPU runtime computes each entry as one sum in the compute type C = compute_t<T> (the bias
/// or basis copy written first, then y += x W by a GEMM in any order, with or without FMA):
///   |y_C - y| <= gamma_terms(u_C) mag            (Higham, Accuracy and Stability, eq. 3.13)
/// and, for 16-bit T only, rounds it once to T: |y_T - y_C| <= u_T |y_C| + eta_T (eta: underflow,
/// an output entry near 0 can be subnormal in fp16). The double oracle is the same sum with
/// |want - y| <= gamma_terms(u_64) mag. Hence, with |y_C| <= |want| + (both gammas) mag,
///   |y_T - want| <= (1 + u_T) (gamma_terms(u_C) + gamma_terms(u_64)) mag + u_T |want| + eta_T,
/// with u_T = eta_T = 0 for float and double (the GEMM writes y in T). First order in u_64 only
/// (mag is computed in double: relative error gamma_terms(u_64), negligible against the bound).
/// bf16 on a CPU with AVX512_BF16 (detail::bf16_dot_available) takes the vdpbf16ps GEMM: exact
/// products, fp32 sums, the same bound; it flushes products below 2^-126 to zero, which these data
/// (normal inputs of magnitude ~1) never produce.
template <class T>
Eigen::MatrixXd project_bound(const Eigen::MatrixXd& want, const Eigen::MatrixXd& mag, index_t terms) {
  constexpr bool narrow = !std::is_same_v<T, compute_t<T>>;
  const double u_out = narrow ? test::u<T>() : 0.0, eta_out = narrow ? test::eta<T>() : 0.0;
  const double g = (1 + u_out) * (test::gamma<compute_t<T>>(terms) + test::gamma<double>(terms));
  return ((g * mag).array() + u_out * want.cwiseAbs().array() + eta_out).matrix();
}

/// Geometry of a projection case: G heads of rank r from m input channels.
struct bd_shape {
  index_t G, m, r;
};

/// The stored-value reference of a BD projection in double: want = x_S + x_rest C_g + b'_g per head
/// (each with its group's channels) and mag, the same sums of absolute values (project_bound's).
template <class T>
std::pair<Eigen::MatrixXd, Eigen::MatrixXd> stored_sums(const bd::bd_projection<T>& p, const Eigen::MatrixXd& xd) {
  const index_t r = p.rank, nr = p.in_dim - r, G = p.heads;
  const Eigen::MatrixXd cd = test::to_double(p.coeff);
  Eigen::MatrixXd want(xd.rows(), G * r), mag(xd.rows(), G * r), xs(xd.rows(), r), xr(xd.rows(), nr);
  for (index_t g = 0; g < G; ++g) {
    for (index_t i = 0; i < r; ++i) xs.col(i) = xd.col(p.basis_of(g)[i]);
    for (index_t l = 0; l < nr; ++l) xr.col(l) = xd.col(p.rest_of(g)[l]);
    want.middleCols(g * r, r) = xr * cd.middleCols(g * r, r) + xs;
    mag.middleCols(g * r, r) = xr.cwiseAbs() * cd.middleCols(g * r, r).cwiseAbs() + xs.cwiseAbs();
    for (index_t j = 0; j < r && !p.bias.empty(); ++j) {
      const double bj = static_cast<double>(detail::to_compute<compute_t<T>>(p.bias[std::size_t(g * r + j)]));
      want.col(g * r + j).array() += bj;
      mag.col(g * r + j).array() += std::abs(bj);
    }
  }
  return {want, mag};
}

template <class T>
void bd_projection_case(bool with_bias, index_t tokens, int threads, bd_shape shape = {3, 40, 8}) {
  set_threads(threads);
  test::seed(100 + tokens + 7 * with_bias + shape.m);
  const index_t G = shape.G, m = shape.m, r = shape.r, nr = m - r;
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
  INFO(to_string(dtype_of_v<T>) << " tokens " << tokens << " bias " << with_bias << " threads " << threads << " G " << G
                                << " m " << m << " r " << r);

  // Reference from the stored numbers: y_g = x_S + x_rest C_g + b'_g in double, with C_g and b'_g as
  // stored in T (p.coeff, p.bias), so that only the runtime's arithmetic separates the two.
  const Eigen::MatrixXd xd = test::to_double(x);
  Eigen::MatrixXd xr(tokens, nr);  // the rest channels (the oracle's error terms below)
  for (index_t l = 0; l < nr; ++l) xr.col(l) = xd.col(p.rest[l]);
  const auto [want, mag] = stored_sums(p, xd);
  // Each entry is one sum of m - r products, the basis channel and (with a bias) b': see project_bound.
  const Eigen::MatrixXd bound = project_bound<T>(want, mag, nr + 1 + (with_bias ? 1 : 0));

  // The stored numbers against the definition K'_g = (x A_g + b_g) A_S^-1, computed in double from
  // the unrounded A_g and b_g (an independent oracle: explicit inverse of A_S). With exact
  // K* = x_S + x_rest C* + b'* (C* = A_rest A_S^-1, b'* = b A_S^-1), first order in u_64 and entrywise:
  //  * storage: C and b' computed in double (C^, b'^) and rounded to nearest in T:
  //      |C_T - C^| <= u_T |C^| + eta_T,  |b'_T - b'^| <= u_T |b'^| + eta_T  (u_T = eta_T = 0 for double);
  //  * the library's double solves through P A_S = L U (partial pivoting): C^ (A_S + dA) = A_rest
  //    with |dA| <= gamma_3r P^T |L||U| (Higham Thm 9.4 with the triangular solves), so
  //      |C^ - C*| <= gamma_3r |C^| P^T|L||U| |A_S^-1|, and the same for b'^ (|L||U| from the same
  //    deterministic PartialPivLU recomputed here). For T != double, C^ may instead come from the
  //    pivot swaps' rank-1 updates, kept only when a probe finds C^ A_S = A_rest to 1e-3 u_T: an
  //    error three orders below the storage term, which dominates;
  //  * the reference sum x_S + x_rest C_T + b'_T in double: gamma_{m-r+2} (its magnitudes, `mag`);
  //  * the oracle: fl(x A + b) (m + 1 terms: gamma_{m+1} (|x||A| + |b|)), the inverse by LU
  //      (|X^ - A_S^-1| <= gamma_3r |A_S^-1| P^T|L||U| |X^|, Higham 14.3), the product (gamma_r);
  // their sum E bounds |want - oracle| entrywise (gamma in u_64, |A_S^-1| taken as |X^|).
  {
    Eigen::MatrixXd oracle(tokens, G * r), e(tokens, G * r);
    const double us = std::is_same_v<T, double> ? 0.0 : test::u<T>(),
                 es = std::is_same_v<T, double> ? 0.0 : test::eta<T>();
    const double g3r = test::gamma<double>(3 * r);
    for (index_t g = 0; g < G; ++g) {
      const Eigen::MatrixXd ad = test::to_double(a[g]), as = sb.basis_block(g), xi = as.inverse();  // X^
      const Eigen::PartialPivLU<Eigen::MatrixXd> lu(as);
      const Eigen::MatrixXd l = lu.matrixLU().triangularView<Eigen::UnitLower>(),
                            u = lu.matrixLU().triangularView<Eigen::Upper>();
      const Eigen::MatrixXd lu_abs = lu.permutationP().transpose() * (l.cwiseAbs() * u.cwiseAbs());
      const Eigen::MatrixXd solve_gain = g3r * lu_abs * xi.cwiseAbs();  // |C^ - C*| <= |C^| solve_gain
      Eigen::RowVectorXd bd = Eigen::RowVectorXd::Zero(r), bh = Eigen::RowVectorXd::Zero(r);
      if (with_bias) {
        for (index_t j = 0; j < r; ++j) bd(j) = static_cast<double>(detail::to_compute<compute_t<T>>(b[g][j]));
        const auto bi = sb.template inverse_bias<double>(g, b[g].data());
        for (index_t j = 0; j < r; ++j) bh(j) = bi[std::size_t(j)];
      }
      const Eigen::MatrixXd ch = sb.coefficients_double(g);
      Eigen::MatrixXd k = xd * ad;
      k.rowwise() += bd;
      oracle.middleCols(g * r, r) = k * xi;
      const Eigen::MatrixXd xa = (xd.cwiseAbs() * ad.cwiseAbs()).rowwise() + bd.cwiseAbs();
      Eigen::MatrixXd eg =
          xr.cwiseAbs() * ((us * ch.cwiseAbs()).array() + es).matrix() + xr.cwiseAbs() * (ch.cwiseAbs() * solve_gain) +
          test::gamma<double>(m + 1) * xa * xi.cwiseAbs() + test::gamma<double>(r) * k.cwiseAbs() * xi.cwiseAbs() +
          k.cwiseAbs() * (xi.cwiseAbs() * solve_gain);
      if (with_bias) eg.rowwise() += ((us * bh.cwiseAbs()).array() + es).matrix() + bh.cwiseAbs() * solve_gain;
      e.middleCols(g * r, r) = eg + test::gamma<double>(nr + 2) * mag.middleCols(g * r, r);
    }
    const double ratio = test::max_error_ratio(want, oracle, e);
    INFO("stored-value reference against (x A + b) A_S^-1: worst entry at " << ratio << " of its bound");
    CHECK(ratio <= 1);
  }

  matrix<T> y(tokens, G * r);
  test::poison(y);
  bd::project(cpu{}, p, x.view(), y.view());
  const double e_gather = test::max_error_ratio(test::to_double(y), want, bound);
  INFO("gathered basis: worst entry at " << e_gather << " of its bound");
  CHECK(e_gather <= 1);

  // The same projection with the input channels permuted upstream so that the basis is leading:
  // the zero-copy path computes the same sums (same bound).
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
  const double e_lead = test::max_error_ratio(test::to_double(y2), want, bound);
  INFO("leading basis: worst entry at " << e_lead << " of its bound");
  CHECK(e_lead <= 1);

  // Caller-owned workspace of exactly the queried size, and a strided output (same bound).
  std::vector<unsigned char> ws(bd::workspace_bytes(cpu{}, p, tokens));
  matrix<T> wide(tokens, G * r + 5);
  test::poison(wide);
  matrix_view<T> ys(wide.data() + 2, tokens, G * r, G * r + 5);
  bd::project(cpu{}, p, x.view(), ys, ws.data(), ws.size());
  const double e_ws = test::max_error_ratio(test::to_double(matrix_view<const T>(ys)), want, bound);
  INFO("caller workspace, strided output: worst entry at " << e_ws << " of its bound");
  CHECK(e_ws <= 1);
  for (index_t t = 0; t < tokens; ++t) CHECK(std::isnan(static_cast<double>(detail::to_compute<float>(wide(t, 0)))));
  set_threads(1);
}

template <class T>
void dense_projection_case(index_t tokens, int threads, index_t in = 24, index_t out = 40) {
  set_threads(threads);
  test::seed(200 + tokens + in);
  const auto w = test::random_matrix<T>(in, out);
  const auto b = test::random_vector<T>(out);
  const auto x = test::random_matrix<T>(tokens, in);
  const auto p = bd::make_dense_projection<T>(w.view(), b.data());
  CHECK(p.bytes() == std::size_t(in * out + out) * sizeof(T));
  // The stored weight and bias are copies of w and b (same type: no rounding).
  const Eigen::MatrixXd xd = test::to_double(x), wd = test::to_double(p.weight);
  CHECK((wd - test::to_double(w)).norm() == 0.0);
  Eigen::MatrixXd want = xd * wd, mag = xd.cwiseAbs() * wd.cwiseAbs();
  for (index_t j = 0; j < out; ++j) {
    const double bj = static_cast<double>(detail::to_compute<compute_t<T>>(b[j]));
    CHECK(static_cast<double>(detail::to_compute<compute_t<T>>(p.bias[std::size_t(j)])) == bj);
    want.col(j).array() += bj;
    mag.col(j).array() += std::abs(bj);
  }
  matrix<T> y(tokens, out);
  test::poison(y);
  bd::project(cpu{}, p, x.view(), y.view());
  // Each entry is one sum of `in` products and the bias: in + 1 terms (see project_bound).
  const double ratio = test::max_error_ratio(test::to_double(y), want, project_bound<T>(want, mag, in + 1));
  INFO(to_string(dtype_of_v<T>) << " tokens " << tokens << " threads " << threads << " in " << in << " out " << out
                                << ": worst entry at " << ratio << " of its bound");
  CHECK(ratio <= 1);
  set_threads(1);
}

/// A projection with Q basis groups of G / Q heads (each group factorized on its own heads, as
/// prepare_mha does per kv head) against the double sum of its stored values, head by head with its
/// group's channels: the same sums and bound as the shared case (project_bound).
template <class T>
void grouped_projection_case(bool with_bias, index_t tokens, int threads, index_t G, index_t Q, index_t m, index_t r) {
  set_threads(threads);
  test::seed(400 + tokens + 7 * with_bias + 11 * Q);
  const index_t nr = m - r, hq = G / Q;
  std::vector<matrix<T>> a;
  std::vector<std::vector<T>> b;
  std::vector<const T*> bp;
  for (index_t g = 0; g < G; ++g) a.push_back(test::random_matrix<T>(m, r)), b.push_back(test::random_vector<T>(r));
  for (index_t g = 0; g < G; ++g) bp.push_back(b[g].data());
  std::vector<bd::shared_basis> bases;
  for (index_t q = 0; q < Q; ++q) {
    std::vector<matrix_view<const T>> av;
    for (index_t h = q * hq; h < (q + 1) * hq; ++h) av.push_back(a[h].view());
    bases.push_back(bd::factorize<T>(av));
  }
  const auto p = bd::make_bd_projection<T>(bases, with_bias ? bp : std::vector<const T*>{});
  REQUIRE(p.groups == Q);
  REQUIRE(p.heads == G);
  CHECK(p.bytes() == std::size_t(nr * G * r + (with_bias ? G * r : 0)) * sizeof(T));
  CHECK(p.basis_leading() == false);
  INFO(to_string(dtype_of_v<T>) << " tokens " << tokens << " bias " << with_bias << " threads " << threads << " G " << G
                                << " groups " << Q << " m " << m << " r " << r);
  // Each head's stored coefficients are its group basis's C (rounded to T), in its group's rest order.
  for (index_t g = 0; g < G; ++g) {
    const bd::shared_basis& sb = bases[std::size_t(g / hq)];
    CHECK(std::equal(sb.basis().begin(), sb.basis().end(), p.basis_of(g)));
    CHECK(std::equal(sb.rest().begin(), sb.rest().end(), p.rest_of(g)));
    CHECK(
        (test::to_double(sb.template coefficients<T>(g % hq)) - test::to_double(p.coeff).middleCols(g * r, r)).norm() ==
        0.0);
  }
  const auto x = test::random_matrix<T>(tokens, m);
  const auto [want, mag] = stored_sums(p, test::to_double(x));
  const Eigen::MatrixXd bound = project_bound<T>(want, mag, nr + 1 + (with_bias ? 1 : 0));
  matrix<T> y(tokens, G * r);
  test::poison(y);
  std::vector<unsigned char> ws(bd::workspace_bytes(cpu{}, p, tokens));
  bd::project(cpu{}, p, x.view(), y.view(), ws.data(), ws.size());
  const double ratio = test::max_error_ratio(test::to_double(y), want, bound);
  INFO("worst entry at " << ratio << " of its bound");
  CHECK(ratio <= 1);
  // A slice of whole groups keeps their bases and computes the same columns (same bound).
  if (Q > 1) {
    const auto s = bd::slice_heads(p, hq, hq * (Q - 1));
    CHECK(s.groups == Q - 1);
    CHECK(std::equal(s.basis.begin(), s.basis.end(), p.basis.begin() + r));
    matrix<T> ys(tokens, (G - hq) * r);
    test::poison(ys);
    bd::project(cpu{}, s, x.view(), ys.view());
    const double rs =
        test::max_error_ratio(test::to_double(ys), want.rightCols((G - hq) * r), bound.rightCols((G - hq) * r));
    INFO("slice: worst entry at " << rs << " of its bound");
    CHECK(rs <= 1);
    if (hq > 1) CHECK_THROWS_AS(bd::slice_heads(p, 1, hq), basisattn::error);
  }
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
  // An odd number of rest channels (33: the bf16 GEMM pairs the last one with zero) and an output
  // width (40) that ends inside a 32-column block.
  for (index_t tokens : {13, 300}) bd_projection_case<TestType>(true, tokens, 2, {5, 41, 8});
}

TEMPLATE_TEST_CASE("BD projection with a basis per group of heads matches its stored values in double", "", float,
                   double, Eigen::half, Eigen::bfloat16) {
  for (index_t tokens : {1, 300})
    for (int threads : {1, 2})
      for (bool bias : {true, false}) {
        grouped_projection_case<TestType>(bias, tokens, threads, 4, 4, 41, 8);  // a basis per head
        grouped_projection_case<TestType>(bias, tokens, threads, 6, 2, 40, 8);  // 3 heads per basis: 24 columns
      }
  // Bases that cannot be grouped: another rank, or another head count.
  test::seed(401);
  std::vector<matrix<TestType>> a = {test::random_matrix<TestType>(20, 4), test::random_matrix<TestType>(20, 5),
                                     test::random_matrix<TestType>(20, 4)};
  const auto b0 = bd::factorize<TestType>(std::vector<matrix_view<const TestType>>{a[0].view()});
  const auto b1 = bd::factorize<TestType>(std::vector<matrix_view<const TestType>>{a[1].view()});
  const auto b2 = bd::factorize<TestType>(std::vector<matrix_view<const TestType>>{a[0].view(), a[2].view()});
  CHECK_THROWS_AS(bd::make_bd_projection<TestType>(std::vector<bd::shared_basis>{b0, b1}), basisattn::error);
  CHECK_THROWS_AS(bd::make_bd_projection<TestType>(std::vector<bd::shared_basis>{b0, b2}), basisattn::error);
  CHECK_THROWS_AS(bd::make_bd_projection<TestType>(std::vector<bd::shared_basis>{}), basisattn::error);
  // A hand-built projection whose lists disagree with its groups is refused before any read.
  auto p = bd::make_bd_projection<TestType>(std::vector<bd::shared_basis>{b0, b0});
  const auto x = test::random_matrix<TestType>(3, 20);
  matrix<TestType> y(3, 8);
  auto code = [&](const bd::bd_projection<TestType>& q) -> std::optional<errc> {
    try {
      bd::project(cpu{}, q, x.view(), y.view());
    } catch (const basisattn::error& e) {
      return e.code();
    }
    return std::nullopt;
  };
  CHECK(!code(p));
  auto bad = p;
  bad.groups = 3;  // does not divide 2 heads
  CHECK(code(bad) == errc::invalid_argument);
  bad = p;
  bad.groups = 1;  // the lists hold two groups
  CHECK(code(bad) == errc::shape_mismatch);
  bad = p;
  bad.rest.back() = 20;  // channel out of range
  CHECK(code(bad) == errc::invalid_argument);
  CHECK_THROWS_AS(bd::workspace_bytes(cpu{}, bad, 3), basisattn::error);
}

TEMPLATE_TEST_CASE("dense projection matches x W + b computed in double", "", float, double, Eigen::half,
                   Eigen::bfloat16) {
  for (index_t tokens : {1, 7, 300, 777})
    for (int threads : {1, 2}) dense_projection_case<TestType>(tokens, threads);
  // Odd inner dimension, output width past two 32-column blocks.
  for (index_t tokens : {5, 300}) dense_projection_case<TestType>(tokens, 2, 23, 70);
}

TEST_CASE("slices of a projection are the matching columns of the whole") {
  // A slice stores a copy of the whole's numbers (checked bitwise: data, not arithmetic). Its output
  // is the same sums computed by a GEMM of another width, whose blocking and so summation order may
  // differ (it does between AVX2 and AVX-512 builds): each output entry of the slice and of the whole
  // is checked against the double product of the stored values with the componentwise bound of a
  // sum of k products rounded in T, gamma_k (|x| |W|) (Higham, Accuracy and Stability, eq. 3.13;
  // FMA only tightens it), so they are within 2 gamma_k (|x| |W|) of each other.
  test::seed(300);
  std::vector<matrix<float>> a;
  std::vector<matrix_view<const float>> av;
  for (int g = 0; g < 4; ++g) a.push_back(test::random_matrix<float>(30, 6));
  for (auto& m : a) av.push_back(m.view());
  const auto p = bd::make_bd_projection<float>(bd::factorize<float>(av));
  const auto s = bd::slice_heads(p, 1, 2);
  CHECK(s.basis == p.basis);
  CHECK(s.rest == p.rest);
  CHECK(s.bytes() * 2 == p.bytes());
  CHECK((test::to_double(s.coeff) - test::to_double(p.coeff).middleCols(6, 12)).norm() == 0.0);
  const auto x = test::random_matrix<float>(9, 30);
  matrix<float> y(9, 24), ys(9, 12);
  bd::project(cpu{}, p, x.view(), y.view());
  bd::project(cpu{}, s, x.view(), ys.view());
  // y_g = x_S + x_rest C_g: m - r + 1 = 25 terms per entry.
  const Eigen::MatrixXd xd = test::to_double(x), cd = test::to_double(p.coeff);
  Eigen::MatrixXd xs(9, 6), xr(9, 24);
  for (index_t i = 0; i < 6; ++i) xs.col(i) = xd.col(p.basis[std::size_t(i)]);
  for (index_t l = 0; l < 24; ++l) xr.col(l) = xd.col(p.rest[std::size_t(l)]);
  Eigen::MatrixXd want = xr * cd, mag = xr.cwiseAbs() * cd.cwiseAbs();
  for (index_t g = 0; g < 4; ++g) want.middleCols(g * 6, 6) += xs, mag.middleCols(g * 6, 6) += xs.cwiseAbs();
  const double gamma_bd = test::gamma<float>(25);
  CHECK(((test::to_double(y) - want).cwiseAbs().array() <= gamma_bd * mag.array()).all());
  CHECK(((test::to_double(ys) - want.middleCols(6, 12)).cwiseAbs().array() <= gamma_bd * mag.middleCols(6, 12).array())
            .all());

  const auto d = bd::make_dense_projection<float>(test::random_matrix<float>(30, 10).view());
  const auto dc = bd::slice_columns(d, 3, 4);
  CHECK((test::to_double(dc.weight) - test::to_double(d.weight).middleCols(3, 4)).norm() == 0.0);
  matrix<float> yd(9, 10), yc(9, 4);
  bd::project(cpu{}, d, x.view(), yd.view());
  bd::project(cpu{}, dc, x.view(), yc.view());
  const Eigen::MatrixXd wd = test::to_double(d.weight), want_d = xd * wd, mag_d = xd.cwiseAbs() * wd.cwiseAbs();
  const double gamma_d = test::gamma<float>(30);
  CHECK(((test::to_double(yd) - want_d).cwiseAbs().array() <= gamma_d * mag_d.array()).all());
  CHECK(((test::to_double(yc) - want_d.middleCols(3, 4)).cwiseAbs().array() <= gamma_d * mag_d.middleCols(3, 4).array())
            .all());
}

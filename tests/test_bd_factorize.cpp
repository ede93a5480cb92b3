// BD factorization: the identity A B = [I; C] B' (rows permuted) at the storage type's rounding
// level, for every strategy and storage type, on random and on deliberately ill-conditioned
// weights; properties of the shared pivoting rule; the absorbing transforms.
#include <basisattn/bd/factorize.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <catch2/catch.hpp>

#include "bd_test_util.hpp"
#include "expect_error.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <random>
#include <string>
#include <type_traits>

using namespace basisattn;
using test::index_t;

namespace {

template <class T>
struct heads_fixture {
  std::vector<matrix<T>> a, b;
  std::vector<matrix_view<const T>> views() const {
    std::vector<matrix_view<const T>> v;
    for (const auto& m : a) v.push_back(m.view());
    return v;
  }
};

/// G random heads A_g (m x r) and B_g (r x n); with `ill` > 0 the first r rows and the last r rows of
/// every A_g are scaled copies of one row plus noise of relative size `ill`, so both candidates of
/// residual_min (and first_r) are nearly singular while the middle rows are well spread.
template <class T>
heads_fixture<T> make_heads(index_t G, index_t m, index_t r, index_t n, double ill, std::uint64_t seed) {
  test::seed(seed);
  heads_fixture<T> f;
  for (index_t g = 0; g < G; ++g) {
    f.a.push_back(test::random_matrix<T>(m, r));
    f.b.push_back(test::random_matrix<T>(r, n));
    if (ill > 0) {
      auto& a = f.a.back();
      for (index_t i = 1; i < r; ++i)
        for (index_t j = 0; j < r; ++j) {
          const double top = static_cast<double>(detail::to_compute<float>(a(0, j)));
          const double bot = static_cast<double>(detail::to_compute<float>(a(m - 1, j)));
          a(i, j) = detail::from_compute<T>(top * (1 + 0.01 * double(i)) + ill * test::normal());
          a(m - 1 - i, j) = detail::from_compute<T>(bot * (1 - 0.01 * double(i)) + ill * test::normal());
        }
    }
  }
  return f;
}

template <class T>
double product_error(const heads_fixture<T>& f, const bd::shared_basis& sb) {
  std::vector<matrix_view<const T>> b;
  for (const auto& m : f.b) b.push_back(m.view());
  return test::bd_product_error<T>(f.views(), b, sb);
}

/// First-order bound of that error: every stored value carries a relative rounding error <= u, and a
/// row of A B is rebuilt from r rows of B' with coefficients up to max|C|; the factor 4 covers the
/// two roundings (C and B') and the square-root growth of sums of independent errors seen here.
double rounding_bound(double u, const bd::shared_basis& sb) { return 4.0 * u * (1.0 + sb.report().max_abs_coeff); }

/// Bound of product_error: `storage` (a bound of the error of rounding C and B' to T; nothing is
/// rounded for T = double, so it does not apply there) plus the double arithmetic that computes C and
/// B' and the measure itself (test::bd_product_arith_bound: componentwise, first order, any
/// summation order or FMA). For T = double the latter is the whole error; for the other types it is
/// below 1e-6 of the storage term. Being rigorous it is loose for double (~700x the measured error
/// here, mostly the LU backward-error term gamma_3r |C| P^T|L||U| |B|), but holds for any kernel.
template <class T>
double product_bound(const heads_fixture<T>& f, const bd::shared_basis& sb, double storage) {
  std::vector<matrix_view<const T>> b;
  for (const auto& m : f.b) b.push_back(m.view());
  return (std::is_same_v<T, double> ? 0.0 : storage) + test::bd_product_arith_bound(f.views(), b, sb);
}

const bd::strategy all_strategies[] = {bd::strategy::first_r, bd::strategy::residual_min, bd::strategy::shared_pivot};

template <class T>
void identity_on_random_weights() {
  const auto f = make_heads<T>(4, 64, 16, 48, 0.0, 7);
  for (auto st : all_strategies) {
    bd::prepare_options o;
    o.select = st;
    o.max_error_growth = INFINITY;  // measure every strategy, even where the default would refuse it
    const auto sb = bd::factorize<T>(f.views(), o);
    // Storage rounding (rounding_bound) plus the double arithmetic (product_bound).
    const double err = product_error(f, sb), tol = product_bound(f, sb, rounding_bound(test::u<T>(), sb));
    INFO(to_string(dtype_of_v<T>) << " " << to_string(st) << ": error " << err << " (" << err / test::u<T>()
                                  << " u), bound " << tol << " (" << tol / test::u<T>() << " u), margin " << tol / err
                                  << ", max|C| " << sb.report().max_abs_coeff);
    CHECK(err <= tol);
    CHECK(err > 0);  // rounding happened: the comparison is not vacuous
    CHECK(sb.basis().size() == 16);
    CHECK(sb.rest().size() == 48);
  }
  // With well-spread random heads the shared pivot keeps every coefficient small, so the error stays
  // within a few u: for fp32 that is around 1e-7 relative.
  bd::prepare_options o;
  const auto sb = bd::factorize<T>(f.views(), o);
  CHECK(sb.report().max_abs_coeff < 4.0);
  // The reported error growth estimates BD's error relative to storing the dense pair in T; on
  // these isotropic random weights its assumptions hold, so it must predict the measured ratio to
  // within a factor of 2.
  std::vector<matrix_view<const T>> bv;
  for (const auto& m : f.b) bv.push_back(m.view());
  const double dense = test::dense_rounding_error<T>(f.views(), bv);
  if (dense > 0) {  // double storage: the dense pair is exact, there is no ratio to predict
    const double measured = product_error(f, sb) / dense;
    INFO("error growth estimate " << sb.report().error_growth << ", measured ratio " << measured);
    CHECK(sb.report().error_growth < 2 * measured);
    CHECK(sb.report().error_growth > 0.5 * measured);
  }
  // "Within a few u": 8 u_T for the stored types; for T = double nothing is stored rounded and the
  // error is the double arithmetic alone, bounded as in product_bound.
  {
    const double err = product_error(f, sb), tol = product_bound(f, sb, 8 * test::u<T>());
    INFO(to_string(dtype_of_v<T>) << " default options: error " << err / test::u<T>() << " u, bound "
                                  << tol / test::u<T>() << " u, margin " << tol / err);
    CHECK(err <= tol);
  }
}

template <class T>
void pivot_beats_baselines_when_ill_conditioned() {
  const auto f = make_heads<T>(4, 64, 16, 48, 1e-3, 11);
  double err[3];
  for (int s = 0; s < 3; ++s) {
    bd::prepare_options o;
    o.select = all_strategies[s];
    o.max_error_growth = INFINITY;  // measure the baselines instead of refusing them
    try {
      const auto sb = bd::factorize<T>(f.views(), o);
      err[s] = product_error(f, sb);
      if (all_strategies[s] == bd::strategy::shared_pivot) {
        // Storage rounding plus the double arithmetic, as in identity_on_random_weights.
        const double tol = product_bound(f, sb, rounding_bound(test::u<T>(), sb));
        INFO(to_string(dtype_of_v<T>) << " shared_pivot error " << err[s] / test::u<T>() << " u, bound "
                                      << tol / test::u<T>() << " u, margin " << tol / err[s]);
        CHECK(err[s] <= tol);
        CHECK(sb.report().max_abs_coeff < 8.0);
      }
    } catch (const basisattn::error& e) {
      // first_r / residual_min may be rejected outright (coefficients overflow fp16, or rcond below
      // min_rcond): that is the library refusing a bad basis, recorded as an infinite error.
      REQUIRE(all_strategies[s] != bd::strategy::shared_pivot);
      CHECK(e.code() == errc::singular_basis);
      err[s] = INFINITY;
    }
  }
  INFO(to_string(dtype_of_v<T>) << ": first_r " << err[0] / test::u<T>() << " u, residual_min " << err[1] / test::u<T>()
                                << " u, shared_pivot " << err[2] / test::u<T>() << " u");
  CHECK(std::isfinite(err[2]));
  CHECK(err[2] * 10 < err[0]);
  CHECK(err[2] * 10 < err[1]);
}

}  // namespace

TEST_CASE("BD identity holds to rounding on random weights, every strategy, every storage type") {
  identity_on_random_weights<float>();
  identity_on_random_weights<double>();
  identity_on_random_weights<Eigen::half>();
  identity_on_random_weights<Eigen::bfloat16>();
}

TEST_CASE("shared pivoting beats first_r and residual_min by 10x on ill-conditioned weights") {
  pivot_beats_baselines_when_ill_conditioned<float>();
  pivot_beats_baselines_when_ill_conditioned<double>();
  pivot_beats_baselines_when_ill_conditioned<Eigen::half>();
  pivot_beats_baselines_when_ill_conditioned<Eigen::bfloat16>();
}

TEST_CASE("residual_min keeps the better of first-r and last-r") {
  // Make first-r nearly singular but last-r fine: residual_min must pick the last rows.
  test::seed(3);
  heads_fixture<double> f;
  for (int g = 0; g < 3; ++g) {
    f.a.push_back(test::random_matrix<double>(40, 8));
    f.b.push_back(test::random_matrix<double>(8, 10));
    for (int i = 1; i < 8; ++i)
      for (int j = 0; j < 8; ++j) f.a.back()(i, j) = f.a.back()(0, j) * (1 + 0.1 * i) + 1e-3 * test::normal();
  }
  bd::prepare_options o;
  o.select = bd::strategy::residual_min;
  const auto sb = bd::factorize<double>(f.views(), o);
  for (int i = 0; i < 8; ++i) CHECK(sb.basis()[i] == 32 + i);
  o.select = bd::strategy::first_r;
  CHECK_THROWS_AS(bd::factorize<double>(f.views(), o), basisattn::error);  // refused: error growth
  o.max_error_growth = INFINITY;
  const auto fr = bd::factorize<double>(f.views(), o);
  CHECK(fr.report().min_rcond < sb.report().min_rcond * 1e-3);
  CHECK(fr.report().error_growth > 100);
}

TEST_CASE("shared pivoting without error refinement ends at a joint max-volume basis") {
  SECTION("one head: every coefficient is at most swap_gain in magnitude") {
    const auto f = make_heads<double>(1, 96, 24, 4, 0.0, 5);
    bd::prepare_options o;
    o.refine_error = false;
    o.swap_gain = 1.01;
    const auto sb = bd::factorize<double>(f.views(), o);
    CHECK_FALSE(sb.report().swap_limit_hit);
    CHECK(sb.coefficients_double(0).cwiseAbs().maxCoeff() <= 1.01 + 1e-9);
  }
  SECTION("several heads: no swap grows prod_g |det A_g[S]| by more than swap_gain") {
    const auto f = make_heads<double>(6, 80, 12, 4, 1e-2, 9);
    bd::prepare_options o;
    o.refine_error = false;
    const auto sb = bd::factorize<double>(f.views(), o);
    CHECK_FALSE(sb.report().swap_limit_hit);
    Eigen::MatrixXd lsum = Eigen::MatrixXd::Zero(80 - 12, 12);
    for (index_t g = 0; g < 6; ++g) lsum.array() += sb.coefficients_double(g).array().abs().log();
    CHECK(lsum.maxCoeff() <= std::log(1.01) + 1e-9);
    // The reported log-volume is the sum of log|det A_g[S]| computed independently here.
    double lv = 0;
    for (index_t g = 0; g < 6; ++g) lv += std::log(std::abs(sb.basis_block(g).determinant()));
    CHECK(sb.report().log_volume == Approx(lv).epsilon(1e-9));
    // ... and it is at least that of first_r (the rule maximises it).
    o.select = bd::strategy::first_r;
    o.max_error_growth = INFINITY;
    const auto fr = bd::factorize<double>(f.views(), o);
    CHECK(sb.report().log_volume >= fr.report().log_volume);
  }
}

TEST_CASE("error refinement: no single swap lowers sum_g ||C_g||_F^2 by 0.1%, and it is below the max-volume basis's") {
  const auto f = make_heads<double>(4, 90, 10, 4, 1e-2, 21);
  bd::prepare_options o;
  const auto sb = bd::factorize<double>(f.views(), o);
  o.refine_error = false;
  const auto mv = bd::factorize<double>(f.views(), o);
  auto total = [&](const std::vector<index_t>& basis) {  // independent: C recomputed by a solve
    std::vector<char> in(90, 0);
    for (index_t s : basis) in[static_cast<std::size_t>(s)] = 1;
    double t = 0;
    for (index_t g = 0; g < 4; ++g) {
      const Eigen::MatrixXd a = test::to_double(f.views()[static_cast<std::size_t>(g)]);
      Eigen::MatrixXd as(10, 10), an(80, 10);
      index_t bi = 0, ni = 0;
      for (index_t j = 0; j < 90; ++j) (in[static_cast<std::size_t>(j)] ? as.row(bi++) : an.row(ni++)) = a.row(j);
      const Eigen::MatrixXd c = as.transpose().fullPivLu().solve(an.transpose()).transpose();
      t += 10 + c.squaredNorm();
    }
    return t;
  };
  const double best = total(sb.basis());
  CHECK(best <= total(mv.basis()));
  // Brute force over every single swap.
  double best_swap = INFINITY;
  for (index_t i = 0; i < 10; ++i)
    for (index_t j : sb.rest()) {
      std::vector<index_t> b = sb.basis();
      b[static_cast<std::size_t>(i)] = j;
      best_swap = std::min(best_swap, total(b));
    }
  CHECK(best_swap >= best * (1 - 1e-3) - 1e-9);
}

TEST_CASE("error refinement with pair Grams: no single swap lowers the weighted error estimate by 0.1%") {
  // B's rows on very different scales, so that the product rows ||A_j B||^2 that weigh the basis
  // rows differ by orders of magnitude.
  const index_t G = 3, m = 60, r = 8, n = 12;
  auto f = make_heads<double>(G, m, r, n, 1e-2, 33);
  for (auto& b : f.b)
    for (index_t k = 0; k < r; ++k)
      for (index_t j = 0; j < n; ++j) b(k, j) *= std::pow(10.0, double(k % 4) - 1.5);
  std::vector<Eigen::MatrixXd> grams;
  for (const auto& b : f.b) grams.push_back(bd::pair_gram(std::vector<matrix_view<const double>>{b.view()}));
  bd::prepare_options o;
  const auto sb = bd::factorize<double>(f.views(), o, grams);
  o.refine_error = false;
  const auto mv = bd::factorize<double>(f.views(), o, grams);
  // Independent: C by a solve, the weights from the explicit product A B in double.
  auto estimate = [&](const std::vector<index_t>& basis) {
    std::vector<char> in(m, 0);
    for (index_t s : basis) in[static_cast<std::size_t>(s)] = 1;
    double e = 0;
    for (index_t g = 0; g < G; ++g) {
      const Eigen::MatrixXd a = test::to_double(f.views()[static_cast<std::size_t>(g)]);
      const Eigen::MatrixXd w = (a * test::to_double(f.b[static_cast<std::size_t>(g)].view())).rowwise().squaredNorm();
      Eigen::MatrixXd as(r, r), an(m - r, r);
      Eigen::VectorXd wb(r);
      index_t bi = 0, ni = 0;
      for (index_t j = 0; j < m; ++j) {
        if (in[static_cast<std::size_t>(j)]) wb(bi) = w(j, 0);
        (in[static_cast<std::size_t>(j)] ? as.row(bi++) : an.row(ni++)) = a.row(j);
      }
      const Eigen::MatrixXd c = as.transpose().fullPivLu().solve(an.transpose()).transpose();
      for (index_t k = 0; k < r; ++k) e += wb(k) * (1.0 + 2.0 * c.col(k).squaredNorm());
    }
    return e;
  };
  const double best = estimate(sb.basis());
  CHECK(best <= estimate(mv.basis()));
  double best_swap = INFINITY;
  for (index_t i = 0; i < r; ++i)
    for (index_t j : sb.rest()) {
      std::vector<index_t> b = sb.basis();
      b[static_cast<std::size_t>(i)] = j;
      best_swap = std::min(best_swap, estimate(b));
    }
  CHECK(best_swap >= best * (1 - 1e-3));
  // Bad Grams are refused.
  using test::expect_error;
  expect_error([&] { bd::factorize<double>(f.views(), o, {grams[0]}); }, errc::shape_mismatch,
               "1 pair Gram matrices for 3 heads");
  std::vector<Eigen::MatrixXd> bad = grams;
  bad[1] = Eigen::MatrixXd::Identity(r + 1, r + 1);
  expect_error([&] { bd::factorize<double>(f.views(), o, bad); }, errc::shape_mismatch, "pair Gram 1 is 9x9");
  bad[1] = grams[1];
  bad[2](0, 1) = NAN;
  expect_error([&] { bd::factorize<double>(f.views(), o, bad); }, errc::non_finite, "pair Gram 2");
  bad[2] = -grams[2];
  expect_error([&] { bd::factorize<double>(f.views(), o, bad); }, errc::invalid_argument, "negative diagonal");
}

namespace {
/// The neighbour of x (representable in TS) on TS's grid, from TS's own bit pattern: the oracle of
/// grid_step. Sign-magnitude encoding: one step away from zero adds 1 to the magnitude bits.
template <class TS>
double bit_neighbor(double x, bool up) {
  using U = std::conditional_t<sizeof(TS) == 2, std::uint16_t, std::uint32_t>;
  U bits = Eigen::numext::bit_cast<U>(::basisattn::detail::from_compute<TS>(x));
  const U sign = U(U(1) << (8 * sizeof(U) - 1));
  if ((bits & U(~sign)) == 0)
    bits = up ? U(1) : U(sign | 1u);  // +-0: the smallest subnormal
  else if (((bits & sign) == 0) == up)
    ++bits;  // away from zero
  else
    --bits;
  return static_cast<double>(::basisattn::detail::to_compute<float>(Eigen::numext::bit_cast<TS>(bits)));
}
}  // namespace

TEMPLATE_TEST_CASE("grid_step is the next value of the storage type's grid", "", Eigen::half, Eigen::bfloat16, float) {
  using W = bd::detail::work_t<TestType>;
  const double maxv = ::basisattn::detail::max_finite<TestType>();
  std::vector<double> xs = {0.0, 1.0, -1.0, 0.5, -2.0, 1.5, maxv, -maxv};
  // The smallest subnormal, the smallest normal and their neighbourhood.
  const double tiny = bit_neighbor<TestType>(0.0, true),
               min_normal = static_cast<double>(static_cast<float>(std::numeric_limits<TestType>::min()));
  for (double v : {tiny, 2 * tiny, 3 * tiny, min_normal, bit_neighbor<TestType>(min_normal, false), 2 * min_normal})
    xs.push_back(v), xs.push_back(-v);
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  std::uniform_int_distribution<int> ex(-30, 30), sg(0, 1);
  for (int i = 0; i < 2000; ++i) xs.push_back((sg(rng) ? -1 : 1) * std::ldexp(mant(rng), ex(rng)));
  for (double& x : xs) x = bd::detail::round_to<TestType>(x);  // onto the grid (or +-inf: skipped)
  for (double x : xs) {
    if (!std::isfinite(x)) continue;
    for (bool up : {true, false}) {
      const W got = bd::detail::grid_step<TestType>(static_cast<W>(x), up);
      const double want = bit_neighbor<TestType>(x, up);
      INFO("x = " << x << (up ? " up" : " down"));
      if (std::abs(want) > maxv)
        CHECK(static_cast<double>(got) == x);  // no finite neighbour: stays
      else
        CHECK(static_cast<double>(got) == want);
    }
  }
}

TEST_CASE("grid descent ends where no single grid move lowers the objective, with the gradient kept exact") {
  // min sum_k 0.5 x_k^T H x_k - rhs_k^T x_k over fp16 values, in float (the working type for fp16);
  // r = 21 is not a multiple of the 8-row blocks, n = 37 not one of the 16 columns swept together.
  using TS = Eigen::half;
  using W = float;
  const index_t r = 21, n = 37;
  std::mt19937_64 rng(11);
  std::normal_distribution<double> nd(0.0, 1.0);
  Eigen::MatrixXd f(4 * r, r), xt(r, n);  // H = F^T F / (4 r): condition number about 9
  for (index_t i = 0; i < f.size(); ++i) f.data()[i] = nd(rng);
  for (index_t i = 0; i < xt.size(); ++i) xt.data()[i] = nd(rng);
  Eigen::MatrixXd h = f.transpose() * f / double(4 * r);     // SPD, unit scale
  h.triangularView<Eigen::StrictlyUpper>() = h.transpose();  // exactly symmetric, as grid_descent needs
  const Eigen::MatrixXd rhs = h * xt;                        // minimiser xt, off the grid
  bd::detail::wmat<W> hw = h.cast<W>();
  bd::detail::wrmat<W> x(r, n), z(r, n);
  for (index_t i = 0; i < r; ++i)
    for (index_t k = 0; k < n; ++k) x(i, k) = bd::detail::round_to<TS>(static_cast<W>(xt(i, k)) * W(1.001));
  // The starting point is x rounded from a perturbed minimiser; its gradient in double, then float.
  const Eigen::MatrixXd x0 = x.cast<double>();
  z = (hw.cast<double>() * x0 - rhs).cast<W>();
  const int passes = 500;  // converges long before: the check below needs a finished descent
  bd::detail::grid_descent<TS, W>(hw, x, z, passes);
  const Eigen::MatrixXd xd = x.cast<double>();
  const Eigen::MatrixXd hd = hw.cast<double>();
  const Eigen::MatrixXd ztrue = hd * xd - rhs;
  auto objective = [&](const Eigen::MatrixXd& v) {
    return 0.5 * (v.transpose() * hd * v).trace() - (rhs.transpose() * v).trace();
  };
  CHECK(objective(xd) < objective(x0));
  // The float gradient drifts by at most one rounding per update of its column: K <= passes r
  // updates, each |fl(z + h d) - (z + h d)| <= u (|z| + |h d|), plus the initial rounding. Along
  // the descent the objective only decreases, so ||x - x*||_H <= ||x0 - x*||_H: then
  // ||z||_2 <= sqrt(cond H) ||z0||_2, and |x| <= max |x*| + ||z0||_2 / lambda_min bounds the steps d.
  const double u = test::u<float>();
  const double hmax = hd.cwiseAbs().maxCoeff();
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(hd);
  const double lmin = eig.eigenvalues().minCoeff(), lmax = eig.eigenvalues().maxCoeff();
  const Eigen::MatrixXd z0 = hd * x0 - rhs, xstar = hd.llt().solve(rhs);
  for (index_t k = 0; k < n; ++k) {
    const double zpath = std::sqrt(lmax / lmin) * z0.col(k).norm();
    const double xbound = bd::detail::round_to<TS>(xstar.col(k).cwiseAbs().maxCoeff() + z0.col(k).norm() / lmin);
    const double dpath = 2 * (bit_neighbor<TS>(xbound, true) - xbound);  // also past a binade
    const double zerr = double(passes * r + 1) * u * (zpath + hmax * dpath);
    CHECK((z.col(k).cast<double>() - ztrue.col(k)).cwiseAbs().maxCoeff() <= zerr);
    for (index_t i = 0; i < r; ++i) {
      REQUIRE(bd::detail::round_to<TS>(xd(i, k)) == xd(i, k));  // on the grid
      for (bool up : {true, false}) {
        const double d = bit_neighbor<TS>(xd(i, k), up) - xd(i, k);
        const double gain = d * ztrue(i, k) + 0.5 * d * d * hd(i, i);  // change of the objective
        INFO("column " << k << " row " << i << std::setprecision(17) << ": gain " << gain << ", d " << d << ", zerr "
                       << zerr << ", z " << z(i, k) << " (exact " << ztrue(i, k) << "), h_ii " << hd(i, i));
        CHECK(gain >= -std::abs(d) * zerr);
      }
    }
  }
}

TEMPLATE_TEST_CASE("grid descent makes exactly the moves of a sweep that tests one row at a time", "", Eigen::half,
                   Eigen::bfloat16) {
  // Small integers times powers of two throughout (H, the gradient, the grid steps of values in
  // [1, 4)): every operation of both sweeps is exact, whatever the order or FMA contraction, so
  // the 16-column, 8-row-block sweep must reproduce the plain one bit for bit.
  using TS = TestType;
  using W = float;
  const double step = std::is_same_v<TS, Eigen::half> ? std::ldexp(1.0, -10) : std::ldexp(1.0, -7);  // in [1, 2)
  std::mt19937_64 rng(23);
  std::uniform_int_distribution<int> small(-3, 3), mant(0, 127), grad(-40, 40);
  for (const auto& shape : std::vector<std::pair<index_t, index_t>>{{21, 37}, {8, 16}, {16, 5}, {1, 1}, {9, 33}}) {
    const index_t r = shape.first, n = shape.second;
    bd::detail::wmat<W> h(r, r);
    for (index_t i = 0; i < r; ++i)
      for (index_t l = 0; l <= i; ++l) h(i, l) = h(l, i) = i == l ? W(8 + mant(rng) % 8) : W(small(rng));
    bd::detail::wrmat<W> x(r, n), z(r, n);
    for (index_t i = 0; i < r; ++i)
      for (index_t k = 0; k < n; ++k) {
        x(i, k) = static_cast<W>(1.0 + step * (mant(rng) % static_cast<int>(1 / step / 2)) * 2);  // on the grid
        z(i, k) = static_cast<W>(grad(rng) * step);
      }
    for (int passes : {1, 2, 3}) {
      bd::detail::wrmat<W> xa = x, za = z;
      bd::detail::grid_descent<TS, W>(h, xa, za, passes);
      // The plain sweep: column by column, row by row, one move at a time.
      Eigen::MatrixXd xb = x.template cast<double>(), zb = z.template cast<double>();
      const Eigen::MatrixXd hb = h.template cast<double>();
      for (index_t k = 0; k < n; ++k)
        for (int p = 0; p < passes; ++p)
          for (index_t i = 0; i < r; ++i) {
            const double d = bit_neighbor<TS>(xb(i, k), zb(i, k) < 0) - xb(i, k);
            if (2 * d * zb(i, k) + d * d * hb(i, i) < 0) {
              xb(i, k) += d;
              zb.col(k) += hb.col(i) * d;
            }
          }
      INFO("r " << r << ", n " << n << ", passes " << passes);
      CHECK((xa.template cast<double>() - xb).cwiseAbs().maxCoeff() == 0.0);
      CHECK((za.template cast<double>() - zb).cwiseAbs().maxCoeff() == 0.0);
      CHECK((xa.template cast<double>() - x.template cast<double>()).cwiseAbs().maxCoeff() > 0.0);  // it moved
    }
  }
}

TEMPLATE_TEST_CASE("error-aware rounding: C and B' on TO's grid, product error below rounding each to nearest", "",
                   float, Eigen::half, Eigen::bfloat16) {
  // Well-spread heads (small coefficients: a 16-bit TO is rounded in float), and nearly singular
  // first-r bases (coefficients in the thousands: rounded in double where float is not precise
  // enough, detail::float_work_suffices).
  const bool ill = GENERATE(false, true);
  const auto f = make_heads<double>(3, 64, 8, 40, ill ? 1e-2 : 0.0, 31);
  bd::prepare_options opt;
  if (ill) opt.select = bd::strategy::first_r, opt.max_error_growth = INFINITY;
  const auto sb = bd::factorize<TestType>(f.views(), opt);
  INFO((ill ? "ill-conditioned first_r" : "well-spread shared_pivot") << ", max |C| " << sb.report().max_abs_coeff);
  if (!std::is_same_v<TestType, float>) {  // well spread: every head in float; ill: some in double
    int in_float = 0;
    for (index_t g = 0; g < 3; ++g) {
      const Eigen::MatrixXd& c = sb.coefficients_double(g);
      const Eigen::MatrixXd mtm = Eigen::MatrixXd::Identity(8, 8) + c.transpose() * c;
      in_float += bd::detail::float_work_suffices<TestType>(mtm) ? 1 : 0;
    }
    CHECK((ill ? in_float < 3 : in_float == 3));
  }
  double nearest = 0, aware = 0, den = 0;
  for (index_t g = 0; g < 3; ++g) {
    const Eigen::MatrixXd b = test::to_double(f.b[static_cast<std::size_t>(g)]);
    const auto rp = sb.template round_pair<TestType>(g, b);
    // Oracle: the product in double from the stored values, against A B in double.
    const Eigen::MatrixXd a = test::to_double(f.views()[static_cast<std::size_t>(g)]);
    const Eigen::MatrixXd p = a * b;
    const Eigen::MatrixXd qa = test::bd_product(sb, test::to_double(rp.coeff), test::to_double(rp.b_prime));
    const Eigen::MatrixXd qn = test::bd_product(
        sb, test::to_double(sb.template coefficients<TestType>(g)),
        test::to_double(sb.template absorb_rows<TestType>(g, f.b[static_cast<std::size_t>(g)].view())));
    aware += (qa - p).squaredNorm(), nearest += (qn - p).squaredNorm(), den += p.squaredNorm();
    CHECK(rp.product_error == Approx((qa - p).norm() / p.norm()).epsilon(1e-6));
  }
  const double u = test::u<TestType>();
  INFO("nearest " << std::sqrt(nearest / den) << ", error-aware " << std::sqrt(aware / den));
  CHECK(std::sqrt(aware / den) < 0.8 * std::sqrt(nearest / den));
  if (!ill) CHECK(std::sqrt(aware / den) < 10 * u);  // large coefficients cost more than 10 u
}

TEST_CASE("absorbing transforms match explicit products in double") {
  const auto f = make_heads<double>(2, 30, 6, 9, 0.0, 13);
  const auto sb = bd::factorize<double>(f.views());
  // All in double; bounds entrywise, first order, gamma_k in u_64 (any summation order, with or
  // without FMA; Higham eq. 3.13), r = 6.
  const index_t r = 6;
  const double u = test::u<double>(), gr = test::gamma<double>(r), g3r = test::gamma<double>(3 * r);
  for (index_t g = 0; g < 2; ++g) {
    Eigen::MatrixXd a_s(6, 6);
    for (int i = 0; i < 6; ++i) a_s.row(i) = test::to_double(f.a[g]).row(sb.basis()[i]);
    CHECK((sb.basis_block(g) - a_s).norm() == 0.0);
    // |L||U| of P A_S = L U (partial pivoting, deterministic: the factorization the library solves with).
    const Eigen::PartialPivLU<Eigen::MatrixXd> lu(a_s);
    const Eigen::MatrixXd l = lu.matrixLU().triangularView<Eigen::UnitLower>(),
                          uu = lu.matrixLU().triangularView<Eigen::Upper>();
    const Eigen::MatrixXd lu_abs = lu.permutationP().transpose() * (l.cwiseAbs() * uu.cwiseAbs());
    // A_S B: the library's product and this one are r-term sums, each within gamma_r |A_S||B| of the
    // exact product.
    const Eigen::MatrixXd bd = test::to_double(f.b[g]);
    const double e_rows = test::max_error_ratio(test::to_double(sb.absorb_rows<double>(g, f.b[g].view())), a_s * bd,
                                                2 * gr * a_s.cwiseAbs() * bd.cwiseAbs());
    INFO("A_S B: worst entry at " << e_rows << " of its bound");
    CHECK(e_rows <= 1);
    // W A_S^T: the same with W (float, exact in double).
    const auto w = test::random_matrix<float>(5, 6);
    const Eigen::MatrixXd wd = test::to_double(w);
    const double e_cols =
        test::max_error_ratio(test::to_double(sb.absorb_cols<double>(g, w.view())), wd * a_s.transpose(),
                              2 * gr * wd.cwiseAbs() * a_s.cwiseAbs().transpose());
    INFO("W A_S^T: worst entry at " << e_cols << " of its bound");
    CHECK(e_cols <= 1);
    // b A_S^-1 by the LU solve: b' (A_S + dA) = b with |dA| <= gamma_3r P^T|L||U| (Higham Thm 9.4), so
    // |b' A_S - b| <= gamma_3r |b'| P^T|L||U|; computing b' A_S (gamma_r |b'||A_S|) and subtracting b
    // (relative u) here: |fl(b' A_S - b)| <= (1 + u) (gamma_3r |b'| P^T|L||U| + gamma_r |b'||A_S|).
    const auto b = test::random_vector<double>(6);
    const auto bi = sb.inverse_bias<double>(g, b.data());
    Eigen::RowVectorXd bv(r), got(r);
    for (index_t j = 0; j < r; ++j) bv(j) = b[std::size_t(j)], got(j) = bi[std::size_t(j)];
    const Eigen::RowVectorXd res_b = got * a_s - bv;
    const Eigen::RowVectorXd bound_b = (1 + u) * (g3r * got.cwiseAbs() * lu_abs + gr * got.cwiseAbs() * a_s.cwiseAbs());
    const double e_bias = test::max_error_ratio(res_b, Eigen::RowVectorXd::Zero(r), bound_b);
    INFO("b A_S^-1: worst residual entry at " << e_bias << " of its bound");
    CHECK(e_bias <= 1);
    // C A_S = A_rest, the same residual bound for each row of C. (After pivot swaps factorize keeps
    // rank-1-updated coefficients only when a probe finds C A_S = A_rest to 1e-3 u_64 relative, far
    // inside this bound; otherwise C comes from the LU solve.)
    Eigen::MatrixXd a_rest(24, 6);
    for (int l2 = 0; l2 < 24; ++l2) a_rest.row(l2) = test::to_double(f.a[g]).row(sb.rest()[l2]);
    const Eigen::MatrixXd& c = sb.coefficients_double(g);
    const Eigen::MatrixXd res_c = c * a_s - a_rest;
    const Eigen::MatrixXd bound_c = (1 + u) * (g3r * c.cwiseAbs() * lu_abs + gr * c.cwiseAbs() * a_s.cwiseAbs());
    const double e_coeff = test::max_error_ratio(res_c, Eigen::MatrixXd::Zero(24, r), bound_c);
    INFO("C A_S - A_rest: worst residual entry at " << e_coeff << " of its bound");
    CHECK(e_coeff <= 1);
  }
}

TEMPLATE_TEST_CASE("absorbing into 16-bit storage (worked in float) stays within one rounding of the double product",
                   "", Eigen::half, Eigen::bfloat16) {
  const index_t r = 24;
  const auto f = make_heads<float>(1, 60, r, 40, 0.0, 17);
  const auto sb = bd::factorize<TestType>(f.views());
  Eigen::MatrixXd a_s(r, r);
  for (index_t i = 0; i < r; ++i) a_s.row(i) = test::to_double(f.a[0]).row(sb.basis()[std::size_t(i)]);
  const Eigen::MatrixXd bd = test::to_double(f.b[0]);
  // Float's r-term sums are within gamma_r(float) |A_S||B| of the exact product (Higham eq. 3.13);
  // rounding that to TestType adds u_T of its value, plus eta_T near zero.
  const double u16 = test::u<TestType>(), gf = test::gamma<float>(r);
  const double tiny = test::eta<TestType>();
  const Eigen::MatrixXd want = a_s * bd, mag = a_s.cwiseAbs() * bd.cwiseAbs();
  const Eigen::MatrixXd bound = (u16 * (want.cwiseAbs() + gf * mag) + gf * mag).array() + tiny;
  const double e_rows =
      test::max_error_ratio(test::to_double(sb.template absorb_rows<TestType>(0, f.b[0].view())), want, bound);
  INFO("A_S B in 16 bits: worst entry at " << e_rows << " of its bound");
  CHECK(e_rows <= 1);
  const auto w = test::random_matrix<float>(7, r);
  const Eigen::MatrixXd wd = test::to_double(w), want_c = wd * a_s.transpose(),
                        mag_c = wd.cwiseAbs() * a_s.cwiseAbs().transpose();
  const Eigen::MatrixXd bound_c = (u16 * (want_c.cwiseAbs() + gf * mag_c) + gf * mag_c).array() + tiny;
  const double e_cols =
      test::max_error_ratio(test::to_double(sb.template absorb_cols<TestType>(0, w.view())), want_c, bound_c);
  INFO("W A_S^T in 16 bits: worst entry at " << e_cols << " of its bound");
  CHECK(e_cols <= 1);
}

TEST_CASE("factorize_pair gives x A B = (x[S] + x[rest] C) B' for a single pair") {
  test::seed(21);
  const auto a = test::random_matrix<float>(48, 12);
  const auto b = test::random_matrix<float>(12, 20);
  const auto x = test::random_matrix<double>(5, 48);
  const auto pf = bd::factorize_pair<float>(a.view(), b.view());
  const Eigen::MatrixXd xd = test::to_double(x), ad = test::to_double(a), bd = test::to_double(b);
  const Eigen::MatrixXd want = xd * ad * bd;
  Eigen::MatrixXd xs(5, 12), xr(5, 36);
  for (int i = 0; i < 12; ++i) xs.col(i) = xd.col(pf.basis[i]);
  for (int l = 0; l < 36; ++l) xr.col(l) = xd.col(pf.rest[l]);
  const Eigen::MatrixXd cd = test::to_double(pf.coeff), bp = test::to_double(pf.b_prime);
  const Eigen::MatrixXd got = (xs + xr * cd) * bp;
  // Entrywise, first order. Exactly, x A B = (x_S + x_rest C*) B'* (C* = A_rest A_S^-1, B'* = A_S B), so
  //   got - x A B = x_rest (C_T - C*) B'_T + (x_S + x_rest C*) (B'_T - B'*) + double arithmetic.
  // C_T and B'_T are C and B' rounded to nearest float: |C_T - C| <= u_f |C| + eta_f, and the double
  // values carry errors below 1e-3 u_f relative (updated C is kept only within 1e-3 u_f, a solved one
  // and the 12-term B' are ~1e-16): us = 1.002 u_f covers both and |C| <= (1 + u_f) |C_T|. Double
  // arithmetic: got is a 37-term sum then a 12-term sum (gamma_49), want a 48-term then a 12-term sum
  // (gamma_60), of the magnitudes M and N below.
  const double us = 1.002 * test::u<float>(), ef = test::eta<float>();
  const Eigen::MatrixXd mag_in = xs.cwiseAbs() + xr.cwiseAbs() * cd.cwiseAbs();
  const Eigen::MatrixXd bound = xr.cwiseAbs() * ((us * cd.cwiseAbs()).array() + ef).matrix() * bp.cwiseAbs() +
                                mag_in * ((us * bp.cwiseAbs()).array() + ef).matrix() +
                                test::gamma<double>(49) * mag_in * bp.cwiseAbs() +
                                test::gamma<double>(60) * xd.cwiseAbs() * ad.cwiseAbs() * bd.cwiseAbs();
  const double ratio = test::max_error_ratio(got, want, bound);
  INFO("worst entry at " << ratio << " of its bound");
  CHECK(ratio <= 1);
  CHECK(pf.report.used == bd::strategy::shared_pivot);
  CHECK(pf.report.heads.size() == 1);
}

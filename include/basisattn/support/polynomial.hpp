// basisattn/support/polynomial.hpp - polynomial approximations of exp on a symmetric interval.
//
// Public entry points (namespace basisattn::support):
//   exp_poly                        monomial coefficients of p ~ exp on [-range, range] and its error
//   fit_exp(bound, degree)          Chebyshev interpolant of degree g, converted to monomials (double)
//   fit_exp_auto(bound, max_degree, target, degree_cap)
//                                   the smallest degree g <= min(max_degree, degree_cap) whose relative
//                                   error meets target (the cap when none does)
//
// Method. exp(B t) is interpolated at the g + 1 Chebyshev nodes t_k = cos(pi (k + 1/2) / (g + 1)) of
// [-1, 1]; its Chebyshev coefficients a_j are turned into monomial coefficients of t with the
// recurrence T_{j+1} = 2 t T_j - T_{j-1}, then into coefficients of x = B t by dividing by B^j. The
// error reported is the relative one, max |p(x) - e^x| / e^x, on a grid of 2001 points of [-B, B]
// (both ends included), evaluated with the monomial coefficients (so it includes the conversion's
// rounding). The relative error is what matters for attention: if every weight has relative error
// <= eps < 1, every output row moves by at most eps / (1 - eps) max_j ||v_j - y||.
// Ranges below 1e-6 are widened to 1e-6 (the division by B^j would otherwise overflow; a polynomial
// fitted on a wider interval is still valid on the narrower one).
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {

/// p(x) = sum_t coef[t] x^t approximating exp on [-range, range].
struct exp_poly {
  int degree = 0;
  double range = 0;          ///< half-width of the fitted interval
  double max_rel_error = 0;  ///< max |p(x) - e^x| / e^x on the interval (grid of 2001 points)
  std::vector<double> coef;  ///< degree + 1 monomial coefficients
};

namespace detail {

/// Smallest fitted half-width.
inline constexpr double min_fit_range = 1e-6;

/// p(x) by Horner's rule, coefficients c[0..g].
template <class S>
inline S horner(const S* c, int g, S x) {
  S y = c[g];
  for (int t = g - 1; t >= 0; --t) y = y * x + c[t];
  return y;
}

/// Monomial coefficients (in x) of the degree-g Chebyshev interpolant of exp on [-range, range].
inline std::vector<double> chebyshev_exp_monomial(int g, double range) {
  constexpr double pi = 3.14159265358979323846;
  const int n = g + 1;
  std::vector<double> a(static_cast<std::size_t>(n), 0.0);  // Chebyshev coefficients
  for (int j = 0; j < n; ++j) {
    double s = 0;
    for (int k = 0; k < n; ++k) {
      const double th = pi * (k + 0.5) / n;
      s += std::exp(range * std::cos(th)) * std::cos(j * th);
    }
    a[static_cast<std::size_t>(j)] = (j == 0 ? 1.0 : 2.0) * s / n;
  }
  // Monomial coefficients of T_0 .. T_g, accumulated into c (in t).
  std::vector<double> c(static_cast<std::size_t>(n), 0.0), t0(static_cast<std::size_t>(n), 0.0),
      t1(static_cast<std::size_t>(n), 0.0);
  t0[0] = 1;  // T_0
  c[0] += a[0];
  if (g >= 1) {
    t1[1] = 1;  // T_1
    c[1] += a[1];
  }
  for (int j = 2; j <= g; ++j) {
    std::vector<double> tn(static_cast<std::size_t>(n), 0.0);
    for (int i = 0; i < n; ++i) {
      const double up = i > 0 ? 2.0 * t1[static_cast<std::size_t>(i - 1)] : 0.0;
      tn[static_cast<std::size_t>(i)] = up - t0[static_cast<std::size_t>(i)];
    }
    for (int i = 0; i < n; ++i)
      c[static_cast<std::size_t>(i)] += a[static_cast<std::size_t>(j)] * tn[static_cast<std::size_t>(i)];
    t0 = t1;
    t1 = tn;
  }
  double bp = 1;
  for (int i = 0; i < n; ++i) {
    c[static_cast<std::size_t>(i)] /= bp;
    bp *= range;
  }
  return c;
}

/// max |p(x) - e^x| / e^x on a 2001-point grid of [-range, range].
inline double exp_poly_rel_error(const std::vector<double>& c, double range) {
  const int g = static_cast<int>(c.size()) - 1;
  double err = 0;
  constexpr int pts = 2001;
  for (int i = 0; i < pts; ++i) {
    const double x = -range + 2.0 * range * i / (pts - 1);
    err = std::max(err, std::abs(horner(c.data(), g, x) * std::exp(-x) - 1.0));
  }
  return err;
}

}  // namespace detail

/// Degree-`degree` Chebyshev interpolant of exp on [-bound, bound] (bound >= 0; widened to 1e-6).
inline exp_poly fit_exp(double bound, int degree) {
  BASISATTN_REQUIRE(std::isfinite(bound) && bound >= 0, invalid_argument, "support::fit_exp: bound = ", bound,
                    " must be finite and >= 0");
  BASISATTN_REQUIRE(degree >= 0 && degree <= 64, invalid_argument, "support::fit_exp: degree = ", degree,
                    " must be in [0, 64]");
  exp_poly p;
  p.degree = degree;
  p.range = std::max(bound, detail::min_fit_range);
  p.coef = detail::chebyshev_exp_monomial(degree, p.range);
  p.max_rel_error = detail::exp_poly_rel_error(p.coef, p.range);
  return p;
}

/// The lowest-degree fit in [1, min(max_degree, degree_cap)] with max_rel_error <= target, or the fit
/// at that cap when none meets it.
inline exp_poly fit_exp_auto(double bound, int max_degree, double target, int degree_cap = 64) {
  const int top = std::max(1, std::min(max_degree, degree_cap));
  exp_poly p;
  for (int g = 1; g <= top; ++g) {
    p = fit_exp(bound, g);
    if (p.max_rel_error <= target) break;
  }
  return p;
}

}  // namespace support
BASISATTN_END_NAMESPACE
